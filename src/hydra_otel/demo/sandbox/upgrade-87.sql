-- hydra-otel sandbox: Hydra's schema 86 -> 87 for the tables hydra-otel reads (written for the
-- sandbox, after Hydra's upgrade-87.sql): the resolved derivation of a content-addressed step,
-- stored without the store directory, set exactly when the step's status is 13 (resolved).
alter table buildsteps add column resolveddrvpath text;
alter table buildsteps add constraint buildsteps_resolved_consistent
    check ((status = 13) = (resolveddrvpath is not null));
update schemaversion set version = 87;
