-- hydra-otel sandbox: the part of Hydra's schema version 85 that hydra-otel reads.
--
-- Version 85 is the schema of the legacy Hydra (`src/` layout, C++ queue runner). Its tables below
-- are identical at version 84: upgrade-85.sql only added jobsetevalinputs.shortrevlength.
-- Written for hydra-otel's tests, benchmarks and demo; it is not Hydra's file. It reproduces, for the
-- tables below, Hydra's table and column names, types, NOT NULL constraints, defaults, keys, CHECK
-- constraints, the indexes a reader of these tables relies on, and the NOTIFY triggers, as they are
-- in Hydra's `subprojects/hydra/sql/schemas/hydra-85.sql`. Names are written in lower case: Hydra
-- writes them in CamelCase without quotes, which PostgreSQL folds.
--
-- Left out on purpose:
--   * users, userroles, jobsetinputs and every other table hydra-otel never reads, and with them
--     the foreign key projects.owner -> users (the column itself is kept, NOT NULL as in Hydra);
--   * the nrbuilds counter table and its trigger on builds (it only maintains a count);
--   * the pg_trgm index on builds.drvpath (needs the extension; only speeds up web search).
--
-- The current Hydra's schema 87 is this file plus upgrade-86.sql (buildsteps.drvpath NOT NULL) and
-- upgrade-87.sql (buildsteps.resolveddrvpath and its CHECK), as in Hydra itself.

create table schemaversion (
    version       integer not null
);


create table projects (
    name          text primary key not null,
    displayname   text not null,
    description   text,
    enabled       integer not null default 1,
    hidden        integer not null default 0,
    owner         text not null,  -- Hydra: references users(username); users is not included
    homepage      text,
    declfile      text,
    decltype      text,
    declvalue     text,
    enable_dynamic_run_command boolean not null default false
);


create table jobsets (
    name          text not null,
    id            serial not null,
    project       text not null,
    description   text,
    nixexprinput  text,
    nixexprpath   text,
    errormsg      text,     -- '' after every successful evaluation, not NULL
    errortime     integer,
    lastcheckedtime integer,
    triggertime   integer,
    enabled       integer not null default 1,  -- 0 disabled, 1 enabled, 2 one-shot, 3 one-at-a-time
    enableemail   integer not null default 1,
    hidden        integer not null default 0,
    emailoverride text not null,
    keepnr        integer not null default 3,
    checkinterval integer not null default 300,
    schedulingshares integer not null default 100,
    fetcherrormsg text,
    forceeval     boolean,
    starttime     integer,  -- set while an evaluation runs
    type          integer not null default 0,  -- 0 legacy, 1 flake
    flake         text,
    enable_dynamic_run_command boolean not null default false,
    constraint jobsets_schedulingshares_nonzero_check check (schedulingshares > 0),
    constraint jobsets_type_known_check check (type = 0 or type = 1),
    constraint jobsets_legacy_paths_check
        check ((type = 0) = (nixexprinput is not null and nixexprpath is not null and flake is null)),
    constraint jobsets_flake_paths_check
        check ((type = 1) = (nixexprinput is null and nixexprpath is null and flake is not null)),
    primary key (project, name),
    foreign key (project) references projects(name) on delete cascade on update cascade,
    constraint jobsets_id_unique unique (id)
);


create table builds (
    id            serial primary key not null,
    finished      integer not null,  -- 0 queued or running, 1 finished
    timestamp     integer not null,  -- when the build was queued
    jobset_id     integer not null,
    job           text not null,
    nixname       text,
    description   text,
    drvpath       text not null,
    system        text not null,
    license       text,
    homepage      text,
    maintainers   text,
    maxsilent     integer default 3600,
    timeout       integer default 36000,
    ischannel     integer not null default 0,
    iscurrent     integer default 0,
    priority      integer not null default 0,
    globalpriority integer not null default 0,
    starttime     integer,  -- written only when the build is marked finished
    stoptime      integer,
    iscachedbuild integer,
    buildstatus   integer,
    size          bigint,
    closuresize   bigint,
    releasename   text,
    keep          integer not null default 0,
    notificationpendingsince integer,  -- owned by hydra-notify; hydra-otel never writes it
    check (finished = 0 or (stoptime is not null and stoptime != 0)),
    check (finished = 0 or (starttime is not null and starttime != 0)),
    foreign key (jobset_id) references jobsets(id) on delete cascade
);


create table buildoutputs (
    build         integer not null,
    name          text not null,
    path          text,  -- NULL for content-addressed derivations until built
    primary key (build, name),
    foreign key (build) references builds(id) on delete cascade
);


create table buildsteps (
    build         integer not null,
    stepnr        integer not null,
    type          integer not null,  -- 0 build, 1 substitution
    drvpath       text,  -- NULL on some very old substitution steps
    busy          integer not null,
    status        integer,  -- NULL while the step runs
    errormsg      text,
    starttime     integer,
    stoptime      integer,
    machine       text not null default '',
    system        text,
    propagatedfrom integer,
    overhead      integer,  -- milliseconds
    timesbuilt    integer,
    isnondeterministic boolean,
    primary key (build, stepnr),
    foreign key (build) references builds(id) on delete cascade,
    foreign key (propagatedfrom) references builds(id) on delete cascade
);


create table buildstepoutputs (
    build         integer not null,
    stepnr        integer not null,
    name          text not null,
    path          text,
    primary key (build, stepnr, name),
    foreign key (build) references builds(id) on delete cascade,
    foreign key (build, stepnr) references buildsteps(build, stepnr) on delete cascade
);


create table evaluationerrors (
    id            serial primary key not null,
    errormsg      text,
    errortime     integer
);


create table jobsetevals (
    id            serial primary key not null,
    jobset_id     integer not null,
    evaluationerror_id integer,
    timestamp     integer not null,  -- when the row was added, i.e. the end of the evaluation
    checkouttime  integer not null,  -- seconds
    evaltime      integer not null,  -- seconds
    hasnewbuilds  integer not null,
    hash          text not null,
    nrbuilds      integer,
    nrsucceeded   integer,
    flake         text,
    nixexprinput  text,
    nixexprpath   text,
    foreign key (jobset_id) references jobsets(id) on delete cascade,
    foreign key (evaluationerror_id) references evaluationerrors(id) on delete set null
);


create table jobsetevalinputs (
    eval          integer not null references jobsetevals(id) on delete cascade,
    name          text not null,
    altnr         integer not null,
    type           text not null,
    uri            text,
    revision       text,
    shortrevlength smallint,
    value          text,
    dependency     integer,
    path          text,
    sha256hash    text,
    primary key   (eval, name, altnr),
    foreign key   (dependency) references builds(id)
);

create table jobsetevalmembers (
    eval          integer not null references jobsetevals(id) on delete cascade,
    build         integer not null references builds(id) on delete cascade,
    isnew         integer not null,
    primary key (eval, build)
);


-- Indexes Hydra has on these tables. Note that both jobsetevals indexes are partial: "latest
-- evaluation of a jobset" is only fast for evaluations with new builds.
create index indexbuildstepsonbusy on buildsteps(busy) where busy != 0;
create index indexbuildstepsondrvpath on buildsteps(drvpath);
create index indexbuildstepsonpropagatedfrom on buildsteps(propagatedfrom) where propagatedfrom is not null;
create index indexbuildstepsonstoptime on buildsteps(stoptime desc)
    where starttime is not null and stoptime is not null;
create index indexbuildstepoutputsonpath on buildstepoutputs(path);
create index indexbuildsonfinished on builds(finished) where finished = 0;
create index indexbuildsoniscurrent on builds(iscurrent) where iscurrent = 1;
create index indexbuildsjobsetidcurrentunfinished on builds(jobset_id) where iscurrent = 1 and finished = 0;
create index indexbuildsjobsetidcurrentfinishedstatus on builds(jobset_id, buildstatus)
    where iscurrent = 1 and finished = 1;
create index indexbuildsjobsetidcurrent on builds(jobset_id) where iscurrent = 1;
create index indexbuildsontimestamp on builds(timestamp);
create index indexbuildsonfinishedstoptime on builds(finished, stoptime desc);
create index indexbuildsonjobsetidfinishedid on builds(jobset_id, job, finished, id desc);
create index indexfinishedsuccessfulbuilds on builds(jobset_id, job, finished, buildstatus, id desc)
    where buildstatus = 0 and finished = 1;
create index indexbuildsondrvpath on builds(drvpath);
create index indexbuildsonkeep on builds(keep) where keep = 1;
create index indexbuildsonnotificationpendingsince on builds(notificationpendingsince)
    where notificationpendingsince is not null;
create index indexbuildoutputspath on buildoutputs using hash(path);
create index indexjobsetevalmembersonbuild on jobsetevalmembers(build);
create index indexjobsetevalmembersoneval on jobsetevalmembers(eval);
create index indexjobsetevalsonjobsetid on jobsetevals(jobset_id, id desc) where hasnewbuilds = 1;
create index indexjobsetidevals on jobsetevals(jobset_id) where hasnewbuilds = 1;
create index indexprojectsonenabled on projects(enabled);


-- Payload-less NOTIFY triggers, with Hydra's firing conditions. The *_added/*_deleted ones are
-- statement-level (no "for each row"): they fire once per statement, even one that touches no row,
-- and also for rows removed by an ON DELETE CASCADE. NOTIFY folds identical notifications sent in
-- one transaction into one, so a multi-row UPDATE still delivers one notification per channel.
create function notifyjobsetshareschanged() returns trigger language plpgsql as $$
begin
    notify jobset_shares_changed;
    return null;
end;
$$;
create trigger jobsetshareschanged after update on jobsets for each row
    when (old.schedulingshares != new.schedulingshares)
    execute procedure notifyjobsetshareschanged();

create function notifyjobsetsadded() returns trigger language plpgsql as $$
begin
    notify jobsets_added;
    return null;
end;
$$;
create trigger jobsetsadded after insert on jobsets execute procedure notifyjobsetsadded();

create function notifyjobsetsdeleted() returns trigger language plpgsql as $$
begin
    notify jobsets_deleted;
    return null;
end;
$$;
create trigger jobsetsdeleted after delete on jobsets execute procedure notifyjobsetsdeleted();

create function notifyjobsetschedulingchanged() returns trigger language plpgsql as $$
begin
    notify jobset_scheduling_changed;
    return null;
end;
$$;
create trigger jobsetschedulingchanged after update on jobsets for each row
    when (((old.triggertime is distinct from new.triggertime) and (new.triggertime is not null))
          or (old.checkinterval != new.checkinterval)
          or (old.enabled != new.enabled))
    execute procedure notifyjobsetschedulingchanged();

create function notifybuildsdeleted() returns trigger language plpgsql as $$
begin
    notify builds_deleted;
    return null;
end;
$$;
create trigger buildsdeleted after delete on builds execute procedure notifybuildsdeleted();

create function notifybuildrestarted() returns trigger language plpgsql as $$
begin
    notify builds_restarted;
    return null;
end;
$$;
create trigger buildrestarted after update on builds for each row
    when (old.finished = 1 and new.finished = 0)
    execute procedure notifybuildrestarted();

-- A web "cancel" sets finished = 1, buildstatus = 4 and the times; no build_finished follows.
create function notifybuildcancelled() returns trigger language plpgsql as $$
begin
    notify builds_cancelled;
    return null;
end;
$$;
create trigger buildcancelled after update on builds for each row
    when (old.finished = 0 and new.finished = 1 and new.buildstatus = 4)
    execute procedure notifybuildcancelled();

create function notifybuildbumped() returns trigger language plpgsql as $$
begin
    notify builds_bumped;
    return null;
end;
$$;
create trigger buildbumped after update on builds for each row
    when (old.globalpriority != new.globalpriority)
    execute procedure notifybuildbumped();

-- builds_added has no trigger since upgrade-54.sql: the evaluator and the queue runner send it.


insert into schemaversion (version) values (85);
