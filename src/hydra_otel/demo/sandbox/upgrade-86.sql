-- hydra-otel sandbox: Hydra's schema 85 -> 86 for the tables hydra-otel reads (written for the
-- sandbox, after Hydra's upgrade-86.sql): buildsteps.drvpath becomes NOT NULL. Hydra first fills in
-- placeholder paths for very old substitution steps; a sandbox database has none.
alter table buildsteps alter column drvpath set not null;
update schemaversion set version = 86;
