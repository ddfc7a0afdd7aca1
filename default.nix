# For users without flakes: `nix-build` builds the package; in a NixOS configuration,
#   imports = [ /path/to/hydra-otel/nix/module.nix ];   # the package defaults to ./package.nix
{
  pkgs ? import <nixpkgs> { },
}:
pkgs.callPackage ./package.nix { }
