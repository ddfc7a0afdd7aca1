# NixOS module for hydra-otel: exports Hydra CI's evaluations, builds and steps as OpenTelemetry
# traces (docs/deployment.md, section "NixOS").
#
#   imports = [ hydra-otel.nixosModules.default ];         # flake; or ./hydra-otel/nix/module.nix
#   services.hydra-otel = {
#     enable = true;
#     otlpEndpoint = "http://collector.example.org:4317";
#   };
#
# The package defaults to pkgs.hydra-otel (the flake's overlay) or, without it, to ../package.nix.
# Next to a local Hydra (services.hydra with its own PostgreSQL) it also creates the read-only role
# `hydra_otel` and lets the `hydra-otel` system user log in as that role through peer
# authentication (configurePostgresql).
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  cfg = config.services.hydra-otel;

  # The read-only role of docs/operations.md, and the database the NixOS Hydra module creates.
  dbRole = "hydra_otel";
  dbName = "hydra";
  # Name of the pg_ident.conf map that lets the system user in as dbRole.
  identMapName = "hydra-otel";

  # Idempotent: the role is created only when missing, and GRANT of a privilege that is already
  # held does nothing. Runs at every boot, so grants lost by a Hydra schema migration come back.
  setupSql = pkgs.writeText "hydra-otel-db-setup.sql" ''
    DO $$
    BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '${dbRole}') THEN
        CREATE ROLE ${dbRole} LOGIN;
      END IF;
    END
    $$;
    GRANT CONNECT ON DATABASE ${dbName} TO ${dbRole};
    GRANT USAGE ON SCHEMA public TO ${dbRole};
    GRANT SELECT ON schemaversion, projects, jobsets, jobsetevals, jobsetevalmembers, jobsetevalinputs,
                    evaluationerrors, builds, buildsteps TO ${dbRole};
  '';

  serviceEnvironment =
    {
      HYDRA_OTEL_DATABASE_URL = cfg.databaseUrl;
      HYDRA_OTEL_INSTANCE = cfg.instance;
      OTEL_EXPORTER_OTLP_PROTOCOL = cfg.otlpProtocol;
    }
    // lib.optionalAttrs (cfg.otlpEndpoint != null) { OTEL_EXPORTER_OTLP_ENDPOINT = cfg.otlpEndpoint; }
    // lib.optionalAttrs (cfg.hydraUrl != null) { HYDRA_OTEL_HYDRA_URL = cfg.hydraUrl; }
    // lib.optionalAttrs (cfg.metricsAddress != null) { HYDRA_OTEL_METRICS_ADDRESS = cfg.metricsAddress; }
    // renderSettings cfg.settings;

  # RFC 0042 settings to environment variables: booleans as hydra-otel reads them (true/false),
  # lists comma-separated (OTEL_RESOURCE_ATTRIBUTES-style values are given as one string), null
  # leaves the variable out (hydra-otel's default applies).
  renderValue =
    value:
    if builtins.isBool value then
      lib.boolToString value
    else if builtins.isList value then
      lib.concatMapStringsSep "," toString value
    else
      toString value;
  renderSettings = settings: lib.mapAttrs (_: renderValue) (lib.filterAttrs (_: v: v != null) settings);

  # Hydra's data directory (/var/lib/hydra, 0750 hydra:hydra in nixpkgs) and its build logs
  # (0750 hydra-queue-runner:hydra): readable through the group hydra only.
  hydraLocal = config.services.hydra.enable or false;
  hydraBaseDir = config.services.hydra.baseDir or "/var/lib/hydra";
in
{
  options.services.hydra-otel = {
    enable = lib.mkEnableOption "hydra-otel, which exports Hydra's evaluations, builds and steps as OpenTelemetry traces";

    # nixpkgs has no hydra-otel: the flake's overlay provides pkgs.hydra-otel; without it the
    # package is built from this checkout's package.nix.
    package =
      lib.mkPackageOption pkgs "hydra-otel" { }
      // {
        default = pkgs.hydra-otel or (pkgs.callPackage ../package.nix { });
        defaultText = lib.literalExpression "pkgs.hydra-otel or (pkgs.callPackage ./package.nix { })";
      };

    user = lib.mkOption {
      type = lib.types.str;
      default = "hydra-otel";
      description = ''
        System user the daemon runs as. The default user (and its group) is created by this module;
        any other user must exist already. With `configurePostgresql`, this user may log in to
        PostgreSQL as the role `hydra_otel`.
      '';
    };

    databaseUrl = lib.mkOption {
      type = lib.types.str;
      default = "postgresql://${dbRole}@/hydra?host=/run/postgresql";
      example = "postgresql://hydra_otel@db.example.org/hydra?sslmode=verify-full";
      description = ''
        Hydra's database (`HYDRA_OTEL_DATABASE_URL`). The default connects over the local socket as
        the role `hydra_otel`, which `configurePostgresql` sets up. The role name must be in the
        URL: without it the OS user name (`hydra-otel`, with a dash) would be used as the role.
        Put a password in a pgpass file or in `environmentFile`, never here: this value ends up in
        the world-readable Nix store.
      '';
    };

    otlpEndpoint = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "http://collector.example.org:4317";
      description = ''
        OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`). With `http/protobuf` this is a base URL to
        which `/v1/traces` is appended. `null` keeps hydra-otel's default: `http://localhost:4317`
        for gRPC, `http://localhost:4318/v1/traces` for HTTP.
      '';
    };

    otlpProtocol = lib.mkOption {
      type = lib.types.enum [
        "grpc"
        "http/protobuf"
      ];
      default = "grpc";
      description = "OTLP transport (`OTEL_EXPORTER_OTLP_PROTOCOL`).";
    };

    hydraUrl = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = if config.services.hydra.enable then config.services.hydra.hydraURL else null;
      defaultText = lib.literalExpression "if config.services.hydra.enable then config.services.hydra.hydraURL else null";
      example = "https://hydra.example.org";
      description = ''
        Hydra's web address, for the links from spans to Hydra's pages (`HYDRA_OTEL_HYDRA_URL`).
        It is part of every span's content: keep it stable.
      '';
    };

    instance = lib.mkOption {
      type = lib.types.str;
      default = "hydra";
      description = ''
        Name of this Hydra instance (`HYDRA_OTEL_INSTANCE`). Part of every trace and span ID and
        of the high-availability lock: both hosts of an HA pair must use the same name, and
        changing it gives every trace a new ID.
      '';
    };

    metricsAddress = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "127.0.0.1:9464";
      description = ''
        Serve Prometheus `/metrics` and `/healthz` on this `host:port`
        (`HYDRA_OTEL_METRICS_ADDRESS`); `null` turns the endpoint off. It has no authentication:
        bind it to localhost or a private network.
      '';
    };

    environmentFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/hydra-otel.env";
      description = ''
        Absolute path of a file of `NAME=value` lines for secrets, such as
        `OTEL_EXPORTER_OTLP_HEADERS=authorization=Basic%20...` or a database URL with a password.
        Give it as a string, not a Nix path: a path would be copied into the world-readable store.
        Keep it root-owned with mode 0600; systemd reads it before dropping privileges. Its values
        override the other options.
      '';
    };

    settings = lib.mkOption {
      type = lib.types.submodule {
        # RFC 0042: any variable of docs/configuration.md, typed; the ones below are documented.
        freeformType =
          with lib.types;
          attrsOf (
            nullOr (oneOf [
              str
              int
              bool
              (listOf str)
            ])
          );
        options.HYDRA_OTEL_STEP_LOGS_DIR = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = if hydraLocal then "${hydraBaseDir}/build-logs" else null;
          defaultText = lib.literalExpression ''if config.services.hydra.enable then "''${config.services.hydra.baseDir}/build-logs" else null'';
          description = ''
            Hydra's build-log directory, for the log tails of failed steps. The service joins the
            group `hydra` (`supplementaryGroups`) to read it; `zstd` is on its PATH for `.zst` logs.
          '';
        };
        options.HYDRA_OTEL_STEP_LOGS = lib.mkOption {
          type = lib.types.nullOr lib.types.bool;
          default = null;
          example = false;
          description = "Attach the tail of a failed step's log to its span (hydra-otel's default: true).";
        };
      };
      default = { };
      example = {
        HYDRA_OTEL_MAX_BUILDS_PER_TRACE = 1000;
        HYDRA_OTEL_METRICS_EXPORT = true;
        OTEL_EXPORTER_OTLP_COMPRESSION = "gzip";
        OTEL_RESOURCE_ATTRIBUTES = [
          "deployment.environment.name=production"
          "service.namespace=ci"
        ];
      };
      description = ''
        Further environment variables of the service (docs/configuration.md): booleans become
        `true`/`false`, lists are joined with commas, `null` leaves a variable out. They override
        the variables set from the options above. They are stored in the Nix store: no secrets here
        (use `environmentFile`).
      '';
    };

    supplementaryGroups = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = lib.optional hydraLocal "hydra";
      defaultText = lib.literalExpression ''lib.optional config.services.hydra.enable "hydra"'';
      description = ''
        Groups the service joins. nixpkgs makes Hydra's data directory `0750 hydra:hydra` and its
        build logs `0750 hydra-queue-runner:hydra`: without the group `hydra` the log tails of
        failed steps are empty.
      '';
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [
        "--log-level"
        "debug"
      ];
      description = "Extra command-line arguments of `hydra-otel run`.";
    };

    configurePostgresql = lib.mkOption {
      type = lib.types.bool;
      default = config.services.hydra.enable && config.services.postgresql.enable;
      defaultText = lib.literalExpression "config.services.hydra.enable && config.services.postgresql.enable";
      description = ''
        Set up the local PostgreSQL for hydra-otel: create the read-only role `hydra_otel` with
        `SELECT` on Hydra's tables (the oneshot service `hydra-otel-db-setup`, run as the
        `postgres` user), and let the system user `user` log in as that role by peer
        authentication. Turn it off when Hydra's database is on another host, and create the
        role there as docs/operations.md shows.
      '';
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = cfg.configurePostgresql -> config.services.postgresql.enable;
            message = "services.hydra-otel.configurePostgresql needs a local services.postgresql.";
          }
        ];

        users.users = lib.mkIf (cfg.user == "hydra-otel") {
          hydra-otel = {
            isSystemUser = true;
            group = "hydra-otel";
            description = "hydra-otel daemon";
          };
        };
        users.groups = lib.mkIf (cfg.user == "hydra-otel") { hydra-otel = { }; };

        # For `hydra-otel ids` and `hydra-otel check` from a shell. They need the service's
        # settings (at least HYDRA_OTEL_INSTANCE when it is not "hydra"); run `check` as the
        # service user so that peer authentication and the state directory test are the same.
        environment.systemPackages = [ cfg.package ];

        systemd.services.hydra-otel = {
          description = "hydra-otel: OpenTelemetry traces of Hydra CI evaluations, builds and steps";
          wantedBy = [ "multi-user.target" ];
          # The database and the collector are retried by the daemon itself, so they are not
          # hard dependencies. Ordering after PostgreSQL makes it stop (and flush) first.
          wants = [ "network-online.target" ] ++ lib.optional cfg.configurePostgresql "hydra-otel-db-setup.service";
          after = [
            "network-online.target"
            "postgresql.service"
          ] ++ lib.optional cfg.configurePostgresql "hydra-otel-db-setup.service";
          environment = serviceEnvironment;
          # zstd decompresses Hydra's .zst build logs (steplogs looks it up on PATH).
          path = [ pkgs.zstd ];
          # The daemon exits only on a bug or after losing the HA lock (exit code 3), both fixed
          # by a restart: never stop restarting it.
          unitConfig.StartLimitIntervalSec = 0;

          serviceConfig = {
            Type = "exec";
            ExecStart = utils.escapeSystemdExecArgs (
              [
                "${cfg.package}/bin/hydra-otel"
                "run"
              ]
              ++ cfg.extraArgs
            );
            # A static user, not DynamicUser: PostgreSQL's peer authentication maps the connecting
            # UID to a user name in its own process, which a dynamic user only resolves through
            # nss-systemd while the unit runs.
            User = cfg.user;
            SupplementaryGroups = cfg.supplementaryGroups;
            # The daemon reads $STATE_DIRECTORY (/var/lib/hydra-otel), which systemd creates and
            # chowns; it is the only writable path under ProtectSystem=strict.
            StateDirectory = "hydra-otel";
            StateDirectoryMode = "0700";

            # Exit code 3 (lost the instance lock) restarts it as a standby; exit code 2 (invalid
            # configuration, unusable state directory) cannot be fixed by restarting.
            Restart = "always";
            RestartSec = 2;
            RestartPreventExitStatus = 2;
            # SIGTERM drains and flushes within --shutdown-grace (10 s by default); the stop
            # timeout must be longer, or SIGKILL cuts the flush short.
            KillSignal = "SIGTERM";
            TimeoutStopSec = 30;

            # Hardening, as in deploy/hydra-otel.service (whose comments say why).
            NoNewPrivileges = true;
            CapabilityBoundingSet = "";
            AmbientCapabilities = "";
            ProtectSystem = "strict";
            ProtectHome = true;
            PrivateTmp = true;
            PrivateDevices = true;
            ProtectKernelTunables = true;
            ProtectKernelModules = true;
            ProtectKernelLogs = true;
            ProtectControlGroups = true;
            ProtectClock = true;
            ProtectHostname = true;
            ProtectProc = "invisible";
            RestrictAddressFamilies = [
              "AF_UNIX"
              "AF_INET"
              "AF_INET6"
            ];
            RestrictNamespaces = true;
            LockPersonality = true;
            MemoryDenyWriteExecute = true;
            RestrictRealtime = true;
            RestrictSUIDSGID = true;
            RemoveIPC = true;
            SystemCallArchitectures = "native";
            SystemCallFilter = [ "@system-service" ];
            SystemCallErrorNumber = "EPERM";
            UMask = "0077";
          }
          // lib.optionalAttrs (cfg.user == "hydra-otel") { Group = "hydra-otel"; }
          // lib.optionalAttrs (cfg.environmentFile != null) { EnvironmentFile = cfg.environmentFile; };
        };
      }

      (lib.mkIf cfg.configurePostgresql {
        # pg_ident.conf: the system user may log in as the read-only role, and as nothing else.
        # The order of pg_ident.conf lines does not matter.
        services.postgresql.identMap = ''
          ${identMapName} ${cfg.user} ${dbRole}
        '';

        # pg_hba.conf is read top down and the FIRST line whose type, database and role match
        # decides; a failed authentication does not fall through to later lines. The NixOS Hydra
        # module adds `local hydra all ident map=hydra-users`, which matches every role on the
        # database hydra, and its map has no entry for hydra-otel. If that line came first, our
        # login would be refused, so this line goes before it (lib.mkBefore puts it ahead of the
        # definitions of default priority, Hydra's and NixOS's default rules included). It
        # matches only the role hydra_otel on the database hydra over the local socket, so it
        # changes nothing for any other role.
        services.postgresql.authentication = lib.mkBefore ''
          local ${dbName} ${dbRole} peer map=${identMapName}
        '';

        systemd.services.hydra-otel-db-setup = {
          description = "Read-only PostgreSQL role for hydra-otel";
          wantedBy = [ "multi-user.target" ];
          before = [ "hydra-otel.service" ];
          requires = [ "postgresql.service" ];
          # The grants name Hydra's tables, which hydra-init creates. postgresql.target (NixOS
          # 25.11 and later) also waits for PostgreSQL's own setup; ordering against a unit that
          # does not exist is ignored by systemd.
          wants = lib.optional config.services.hydra.enable "hydra-init.service";
          after = [
            "postgresql.service"
            "postgresql.target"
          ] ++ lib.optional config.services.hydra.enable "hydra-init.service";
          path = [ config.services.postgresql.package ];
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            # The PostgreSQL superuser; Hydra's own setup connects to the database hydra the same
            # way (its ident map lets the postgres system user in as postgres).
            User = "postgres";
            Group = "postgres";
          };
          script = ''
            psql --no-psqlrc --set=ON_ERROR_STOP=1 --dbname=${dbName} --file=${setupSql}
          '';
        };
      })
    ]
  );
}
