# Every importable module of a Python package directory, as dotted names, read from the tree at
# evaluation time (so package.nix's pythonImportsCheck cannot miss a module added later).
# `__main__` modules are left out: importing one runs the program.
let
  inherit (builtins)
    attrNames
    concatMap
    head
    match
    readDir
    ;
  walk =
    dir: prefix:
    let
      entries = readDir dir;
    in
    concatMap (
      name:
      let
        kind = entries.${name};
        stem = match "(.*)\\.py" name;
      in
      if kind == "directory" && (readDir (dir + "/${name}")) ? "__init__.py" then
        [ "${prefix}.${name}" ] ++ walk (dir + "/${name}") "${prefix}.${name}"
      else if kind == "regular" && stem != null && name != "__init__.py" && name != "__main__.py" then
        [ "${prefix}.${head stem}" ]
      else
        [ ]
    ) (attrNames entries);
in
dir: name: [ name ] ++ walk dir name
