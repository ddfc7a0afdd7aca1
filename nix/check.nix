# What can be checked without nixpkgs (.ci/nix-check runs `nix-instantiate --eval --strict` on it):
# package.nix is called with stand-ins for lib and python3Packages and compared with pyproject.toml
# and the source tree; flake.nix's outputs are called with a stand-in nixpkgs; the NixOS module is
# checked to be a module function. Evaluates to a summary, or throws naming what disagrees.
let
  root = ../.;
  inherit (builtins)
    attrNames
    elem
    filter
    functionArgs
    head
    length
    match
    sort
    ;
  check = ok: message: if ok then true else throw "nix/check.nix: ${message}";
  all = builtins.all (x: x);

  # Stand-ins: a derivation function that returns its arguments, packages that are their names.
  lib = {
    fileset = {
      toSource = args: args;
      unions = xs: xs;
    };
    licenses.mit = "mit";
    platforms.linux = [ "x86_64-linux" ];
    genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
  };
  python3Packages =
    let
      names = [
        "asyncpg"
        "grpcio"
        "hypothesis"
        "opentelemetry-exporter-otlp-proto-grpc"
        "opentelemetry-exporter-otlp-proto-http"
        "opentelemetry-sdk"
        "pytest-trio"
        "pytestCheckHook"
        "requests"
        "setuptools"
        "trio"
        "trio-asyncio"
      ];
    in
    lib.genAttrs names (n: n) // { buildPythonApplication = args: args; };
  pkg = import (root + "/package.nix") { inherit lib python3Packages; };

  pyproject = builtins.fromTOML (builtins.readFile (root + "/pyproject.toml"));
  # "trio>=0.27" -> "trio"
  declared = sort builtins.lessThan (
    map (spec: head (match "([A-Za-z0-9_.-]+).*" spec)) pyproject.project.dependencies
  );
  version = head (
    match ''.*__version__ = "([^"]+)".*'' (builtins.readFile (root + "/src/hydra_otel/__init__.py"))
  );

  imports = pkg.pythonImportsCheck;

  flake = import (root + "/flake.nix");
  stubPkgs = {
    callPackage = path: _: import path { inherit lib python3Packages; };
    nixfmt-rfc-style = "nixfmt";
    system = "x86_64-linux";
  };
  outputs = flake.outputs {
    self = outputs;
    nixpkgs = {
      inherit lib;
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (_: stubPkgs);
    };
  };
  overlaid = outputs.overlays.default stubPkgs { };
  module = import (root + "/nix/module.nix");
in
assert check (pkg.pname == "hydra-otel") "pname";
assert check (pkg.version == version) "package.nix's version ${pkg.version} is not __version__ ${version}";
assert check (sort builtins.lessThan pkg.dependencies == declared)
  "package.nix's dependencies differ from pyproject.toml's: ${toString pkg.dependencies} / ${toString declared}";
assert check (!(pkg ? pythonRelaxDeps)) "package.nix relaxes dependencies";
assert check (all (map (m: elem m imports) [ "hydra_otel" "hydra_otel.cli" "hydra_otel.adapters.db" "hydra_otel.core.parse" ]))
  "pythonImportsCheck misses modules: ${toString imports}";
assert check (!(elem "hydra_otel.__main__" imports)) "pythonImportsCheck would run __main__";
assert check (outputs.packages.x86_64-linux.default.pname == "hydra-otel") "flake packages";
assert check (overlaid.hydra-otel.pname == "hydra-otel") "flake overlay";
assert check (elem ./module.nix outputs.nixosModules.default.imports) "flake nixosModules.default";
assert check (all (map (a: (functionArgs module) ? ${a}) [ "config" "lib" "pkgs" ])) "module arguments";
assert check ((functionArgs flake.outputs) ? nixpkgs) "flake outputs take nixpkgs";
{
  package = "${pkg.pname} ${pkg.version}";
  imports = length imports;
  dependencies = pkg.dependencies;
  flake = attrNames outputs;
}
