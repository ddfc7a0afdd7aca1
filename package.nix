# The hydra-otel package: `pkgs.callPackage ./package.nix { }` (default.nix and the flake do this).
#
# Built with nixpkgs' own Python packages. No pythonRelaxDeps: pyproject.toml declares the widest
# ranges the test suite passes on (CI runs it on the lowest and the newest releases), so a nixpkgs
# whose packages fall outside them fails the build's runtime-dependency check, naming the package,
# instead of building a daemon that fails at start (docs/deployment.md, "NixOS").
{
  lib,
  python3Packages,
}:

let
  # One version source: src/hydra_otel/__init__.py, as for the wheel.
  version = builtins.head (
    builtins.match ''.*__version__ = "([^"]+)".*'' (builtins.readFile ./src/hydra_otel/__init__.py)
  );
in
python3Packages.buildPythonApplication {
  pname = "hydra-otel";
  inherit version;
  pyproject = true;

  # Only what the build and the tests read: editing docs or CI files does not rebuild the package.
  src = lib.fileset.toSource {
    root = ./.;
    fileset = lib.fileset.unions [
      ./pyproject.toml
      ./README.md
      ./LICENSE
      ./src
      ./tests
    ];
  };

  build-system = [ python3Packages.setuptools ];

  dependencies = with python3Packages; [
    asyncpg
    opentelemetry-exporter-otlp-proto-grpc
    opentelemetry-exporter-otlp-proto-http
    opentelemetry-sdk
    requests
    trio
    trio-asyncio
  ];

  nativeCheckInputs = with python3Packages; [
    grpcio
    hypothesis
    pytest-trio
    pytestCheckHook
  ];
  # The unit tests; the integration tests start PostgreSQL clusters and OTLP receivers on
  # sockets, which the build sandbox does not give them (CI runs those).
  disabledTestPaths = [ "tests/integration" ];

  # Every module, not only the top package, listed from the tree: a missing or private name in any
  # of them fails here, at build time, instead of at `hydra-otel run`.
  pythonImportsCheck = import ./nix/python-modules.nix ./src/hydra_otel "hydra_otel";

  meta = {
    description = "Turns Hydra CI evaluations, builds and build steps into OpenTelemetry traces";
    license = lib.licenses.mit;
    mainProgram = "hydra-otel";
    platforms = lib.platforms.linux;
  };
}
