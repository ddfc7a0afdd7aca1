{
  description = "hydra-otel: Hydra CI evaluations, builds and build steps as OpenTelemetry traces";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        hydra-otel = pkgs.callPackage ./package.nix { };
        default = hydra-otel;
      });

      overlays.default = final: _prev: { hydra-otel = final.callPackage ./package.nix { }; };

      # The module, with pkgs.hydra-otel from this flake (services.hydra-otel.package's default).
      nixosModules.default = {
        imports = [ ./nix/module.nix ];
        nixpkgs.overlays = [ self.overlays.default ];
      };

      checks = forAllSystems (pkgs: { package = self.packages.${pkgs.system}.default; });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);
    };
}
