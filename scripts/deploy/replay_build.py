#!/usr/bin/env python3
"""Replays the Dockerfile's build stage without a Docker engine (scripts/check-deploy.sh).

`docker build` cannot run where sluice is developed and tested (a docker client, no
engine), and a build that works outside Docker proves nothing about the image: the
daemon sees only the build context, and the builder stage only what its COPY lines
take from it. This replays that stage on this machine, from the same inputs:

1. The build context: the files the daemon would receive, computed by docker-py's own
   `docker.utils.build.exclude_paths` from .dockerignore, read as docker-py reads it
   (the daemon's rules, not a re-implementation), copied into <cache>/context.
2. The stage, parsed with dockerfile-parse: WORKDIR, ENV and ARG as Docker applies them,
   each COPY from the context into <cache>/root, a stand-in for the builder's file
   system (WORKDIR /build is <cache>/root/build). Before anything is built, every file
   the stage's Rust sources embed (include_str!, include_bytes!, include!) must be in
   it: if one is not, this says whether .dockerignore or the COPY lines left it out.
3. Each RUN, as it is written, in that stand-in WORKDIR, with the builder's paths that
   COPY or WORKDIR made (e.g. /usr/local/bin/stub-targets) mapped into <cache>/root,
   under a clean environment: the Dockerfile's ENV and ARGs, plus only what finds the
   toolchain here (PATH, HOME, CARGO_HOME, RUSTUP_HOME). No CARGO_TARGET_DIR: the
   stage's `target` is a symlink to <cache>/target, so cargo's default target dir, the
   RUN lines' own ./target/... paths and the runtime stage's COPY --from paths all
   resolve, and dependencies stay compiled between runs (a cold release build of them
   takes minutes on 2 cores; then a replay compiles sluice itself, as `docker build`
   does after a source change). A RUN that would install packages (apt-get, ...) is
   refused: it would change this machine, not an image.
4. What the final stage copies out of the replayed one (COPY --from=builder ...) must
   exist, and each executable among it must answer --help.

A cargo error that a file could not be read is mapped back the same way as in step 2.
When nothing the stage reads changed since the last successful replay (the Dockerfile's
stage, every copied file, the toolchain's versions), the RUN lines are not run again
(--force runs them).

    scripts/deploy/replay_build.py [--force] [--stage NAME] [--context DIR] [--file DOCKERFILE]

Exit 0 when the stage builds and its artefacts run; 1 with the reason otherwise; 2 when
it cannot replay (missing tools, an instruction it cannot stand in for).
The cache is $SLUICE_REPLAY_CACHE, else $SLUICE_TOOLS/../docker-replay
(~/.cache/sluice/docker-replay).
"""

import argparse
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TOOLS = os.environ.get("SLUICE_TOOLS") or os.path.expanduser("~/.cache/sluice/tools")

try:
    from docker.utils.build import exclude_paths
    from dockerfile_parse import DockerfileParser
    from dockerfile_parse.util import WordSplitter
except ImportError:
    # Run directly (setup.sh's hint names this file): use the tools venv when it exists.
    venv_python = os.path.join(TOOLS, "venv", "bin", "python")
    if os.path.exists(venv_python) and not os.environ.get("SLUICE_REPLAY_REEXEC"):
        os.environ["SLUICE_REPLAY_REEXEC"] = "1"
        os.execv(venv_python, [venv_python, os.path.abspath(__file__), *sys.argv[1:]])
    print("replay_build.py needs docker (docker-py) and dockerfile-parse: run scripts/check-deploy.sh once "
          "(it installs them into the tools venv), or: pip install docker dockerfile-parse", file=sys.stderr)
    sys.exit(2)

# Environment a RUN gets from this machine: only what finds the toolchain. Everything else
# (CARGO_TARGET_DIR, RUSTFLAGS, CARGO_BUILD_*, ...) would make the build differ from the image's.
PASS_ENV = ("PATH", "HOME", "USER", "LANG", "TMPDIR", "CARGO_HOME", "RUSTUP_HOME", "RUSTUP_TOOLCHAIN")
# RUN lines that would change this machine instead of an image.
PACKAGE_MANAGERS = re.compile(r"(^|[\s;&|(])(apt-get|apt|aptitude|apk|dnf|yum|microdnf|dpkg|rpm|"
                              r"useradd|adduser|groupadd|addgroup)(\s|$)")
# Rust macros that read a file at compile time, with a literal path (relative to the file).
INCLUDE = re.compile(r"\binclude(?:_str|_bytes)?!\s*\(\s*\"((?:[^\"\\]|\\.)*)\"\s*\)")
# What rustc and cargo say when a file is missing.
CANT_READ = re.compile(r"(?:couldn't read|failed to read|failed to load manifest for workspace member|"
                       r"can't find `[^`]+` \w+ at) `([^`]+)`")


class Unreplayable(Exception):
    """An instruction this replay cannot stand in for (exit 2)."""


class Failed(Exception):
    """The build as Docker would run it fails (exit 1)."""


def log(msg=""):
    print(msg, flush=True)


# ------------------------------------------------------------------ the build context

def read_dockerignore(context):
    """The exclude list exactly as docker-py's APIClient.build reads .dockerignore."""
    path = os.path.join(context, ".dockerignore")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(filter(lambda x: x != "" and x[0] != "#", [line.strip() for line in f.read().splitlines()]))


def build_context(context, dockerfile, dest):
    """Copies what the daemon would receive into dest; returns the set of relative paths."""
    rel_dockerfile = os.path.relpath(dockerfile, context)
    paths = exclude_paths(context, read_dockerignore(context), dockerfile=rel_dockerfile)
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    files = set()
    for rel in sorted(paths):
        src, dst = os.path.join(context, rel), os.path.join(dest, rel)
        if os.path.islink(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.readlink(src), dst)
            files.add(rel)
        elif os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)
            files.add(rel)
    return files


# ------------------------------------------------------------------ the Dockerfile

class Stage:
    def __init__(self, name, base, index):
        self.name, self.base, self.index = name, base, index
        self.steps = []  # (instruction, value, startline, context)


def parse_stages(dockerfile):
    parser = DockerfileParser(path=dockerfile)
    stages, global_args = [], {}
    for item, ctx in zip(parser.structure, parser.context_structure):
        ins = item["instruction"]
        if ins == "ARG" and not stages:
            global_args.update(ctx.line_args or {})  # ARGs before the first FROM: for FROM lines only
        elif ins == "FROM":
            words = WordSplitter(item["value"], args=global_args, envs={}).split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, words[0], len(stages)))
        elif stages and ins not in ("COMMENT",):
            stages[-1].steps.append((ins, item["value"], item["startline"] + 1, ctx))
    if not stages:
        raise Unreplayable(f"{dockerfile}: no FROM")
    return stages


def split_args(value, ctx):
    """COPY/ADD/WORKDIR arguments, as Docker splits and substitutes them."""
    value = value.strip()
    if value.startswith("["):
        try:
            return [str(w) for w in json.loads(value)]
        except ValueError:
            pass
    return list(WordSplitter(value, args=ctx.args, envs=ctx.envs).split())


def copy_parts(value, ctx):
    words = split_args(value, ctx)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, val = words.pop(0)[2:].partition("=")
        flags[key] = val
    if len(words) < 2:
        raise Unreplayable(f"COPY {value}: needs a source and a destination")
    return flags, words[:-1], words[-1]


def artefacts_from(stages, stage):
    """Paths later stages COPY --from this stage."""
    out = []
    for later in stages[stage.index + 1:]:
        for ins, value, line, ctx in later.steps:
            if ins in ("COPY", "ADD"):
                flags, sources, _ = copy_parts(value, ctx)
                if flags.get("from") in (stage.name, str(stage.index)):
                    out += [(s, line) for s in sources]
    return out


def pick_stage(stages, wanted):
    if wanted:
        for s in stages:
            if s.name == wanted:
                return s
        raise Unreplayable(f"no stage named {wanted!r} (stages: {', '.join(s.name for s in stages)})")
    # The stage the last one takes its artefacts from: the builder.
    for s in reversed(stages[:-1]):
        if artefacts_from(stages, s):
            return s
    return stages[-1]


# ------------------------------------------------------------------ the replayed stage

class Replay:
    """The builder's file system under <cache>/root, with the context's files in it."""

    def __init__(self, root, context_dir, context_files, repo):
        self.root, self.context_dir, self.context_files, self.repo = root, context_dir, context_files, repo
        self.workdir = "/"
        self.mapped = set()        # container paths COPY or WORKDIR made, mapped in RUN lines
        self.origin = {}           # container path of a copied file -> its path in the context
        self.copies = []           # (line, context path) for the cache key

    def host(self, container_path):
        return os.path.join(self.root, container_path.lstrip("/"))

    def absolute(self, path):
        return os.path.normpath(path if path.startswith("/") else os.path.join(self.workdir, path))

    def set_workdir(self, path):
        self.workdir = self.absolute(path)
        os.makedirs(self.host(self.workdir), exist_ok=True)
        if self.workdir != "/":
            self.mapped.add(self.workdir)

    def copy(self, sources, dest, line, dry=False):
        dest_abs = self.absolute(dest)
        into_dir = dest.endswith("/") or dest in (".", "..") or len(sources) > 1
        for source in sources:
            rel = os.path.normpath(source).lstrip("/")
            if rel.startswith(".."):
                raise Failed(f"Dockerfile:{line}: COPY {source}: outside the build context")
            matches = self.glob(rel)
            if not matches:
                raise Failed(self.missing_source(rel, line))
            for match in matches:
                src = os.path.join(self.context_dir, match)
                if os.path.isdir(src) and not os.path.islink(src):
                    for dirpath, _, names in os.walk(src):
                        for n in names:
                            f = os.path.join(dirpath, n)
                            sub = os.path.relpath(f, src)
                            self.place(f, os.path.join(dest_abs, sub), line, dry)
                    self.mapped.add(dest_abs)
                else:
                    target = os.path.join(dest_abs, os.path.basename(match)) if into_dir or \
                        (not dry and os.path.isdir(self.host(dest_abs))) else dest_abs
                    self.place(src, target, line, dry)
                    self.mapped.add(target)

    def glob(self, rel):
        if not any(c in rel for c in "*?["):
            return [rel] if os.path.lexists(os.path.join(self.context_dir, rel)) else []
        return sorted(os.path.relpath(p, self.context_dir) for p in glob.glob(os.path.join(self.context_dir, rel)))

    def place(self, src, container_path, line, dry):
        rel = os.path.relpath(src, self.context_dir)
        self.origin[os.path.normpath(container_path)] = rel
        self.copies.append((line, rel))
        if dry:
            return
        dst = self.host(container_path)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.lexists(dst) and not os.path.isdir(dst):
            os.unlink(dst)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)  # COPY keeps modification times

    def missing_source(self, rel, line):
        if os.path.lexists(os.path.join(self.repo, rel)):
            return (f"Dockerfile:{line}: COPY {rel}: not in the build context: .dockerignore does not admit it "
                    f"(add '!{rel}')")
        return f"Dockerfile:{line}: COPY {rel}: no such file in the repository"

    def explain_missing(self, container_path, needed_by):
        """Why the stage lacks container_path, named by the context path it would come from."""
        container_path = os.path.normpath(container_path)
        inside = self.workdir == "/" or container_path.startswith(self.workdir.rstrip("/") + "/")
        rel = os.path.relpath(container_path, self.workdir) if inside else container_path.lstrip("/")
        if rel.startswith(".."):
            return f"{needed_by} needs {container_path}, outside the builder's WORKDIR {self.workdir}"
        if rel not in self.context_files:
            if os.path.exists(os.path.join(self.repo, rel)):
                return (f"{needed_by} needs {rel}, which is not in the build context: .dockerignore does not "
                        f"admit it (add '!{rel}' to .dockerignore, and COPY it in the Dockerfile)")
            return f"{needed_by} needs {rel}, which does not exist in the repository"
        return (f"{needed_by} needs {rel}: it is in the build context, but no COPY in this stage puts it at "
                f"{container_path} (add: COPY {rel} ./{rel})")

    def missing_includes(self, view):
        """Files the stage's Rust sources embed that the stage does not have.

        view: container path -> host file to read, for every file the stage holds."""
        problems = []
        for cpath, hpath in sorted(view.items()):
            parts = cpath.split("/")
            if not cpath.endswith(".rs") or not ("src" in parts or parts[-1] == "build.rs") or "target" in parts:
                continue  # what `cargo build` compiles: src/ and build scripts, not tests or benches
            try:
                with open(hpath, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for n, text in enumerate(lines, 1):
                for m in INCLUDE.finditer(text):
                    if "//" in text[:m.start()]:
                        continue  # a comment or a doc example
                    wanted = os.path.normpath(os.path.join(os.path.dirname(cpath), m.group(1)))
                    if wanted not in view:
                        origin = self.origin.get(cpath, os.path.relpath(cpath, self.workdir))
                        problems.append(self.explain_missing(wanted, f"{origin}:{n} ({m.group(0)})"))
        return problems

    def host_view(self):
        """Container path -> host path of every file now in the replayed stage (not target/)."""
        view = {}
        for dirpath, dirnames, names in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            for n in names:
                h = os.path.join(dirpath, n)
                view["/" + os.path.relpath(h, self.root)] = h
        return view

    def map_paths(self, text):
        for p in sorted(self.mapped, key=len, reverse=True):
            text = re.sub(r"(?<![\w.\-/$])" + re.escape(p) + r"(?=$|[/\s;&|)'\"<>])",
                          lambda _m, p=p: self.host(p), text)
        return text


def tool_versions():
    out = []
    for cmd in (["rustc", "-vV"], ["cargo", "-V"]):
        try:
            out.append(subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout)
        except OSError:
            out.append(f"{cmd[0]} missing")
    return "".join(out)


def run_env(ctx):
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.update({k: str(v) for k, v in (ctx.args or {}).items()})
    env.update({k: str(v) for k, v in (ctx.envs or {}).items()})
    return env


def diagnose_log(replay, text):
    """Files a failed RUN could not read, explained like missing COPY sources."""
    out = []
    for m in CANT_READ.finditer(text):
        path = m.group(1)
        host = path if os.path.isabs(path) else os.path.join(replay.host(replay.workdir), path)
        host = os.path.normpath(host)
        root = os.path.normpath(replay.root)
        if host.startswith(root + os.sep):
            container = "/" + os.path.relpath(host, root)
            out.append(replay.explain_missing(container, "the build"))
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", default=REPO, help="build context (default: the repository)")
    ap.add_argument("--file", help="Dockerfile (default: CONTEXT/Dockerfile)")
    ap.add_argument("--stage", help="stage to replay (default: the one the last stage copies from)")
    ap.add_argument("--cache", default=os.environ.get("SLUICE_REPLAY_CACHE")
                    or os.path.join(os.path.dirname(TOOLS.rstrip("/")), "docker-replay"))
    ap.add_argument("--force", action="store_true", help="run the RUN lines even if nothing changed")
    a = ap.parse_args()
    context = os.path.abspath(a.context)
    dockerfile = os.path.abspath(a.file or os.path.join(context, "Dockerfile"))
    cache = os.path.abspath(a.cache)
    os.makedirs(cache, exist_ok=True)
    lock = open(os.path.join(cache, "lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # one replay at a time per cache

    stages = parse_stages(dockerfile)
    stage = pick_stage(stages, a.stage)
    artefacts = artefacts_from(stages, stage)
    ctx_dir, root = os.path.join(cache, "context"), os.path.join(cache, "root")
    context_files = build_context(context, dockerfile, ctx_dir)
    log(f"context: {len(context_files)} files admitted by .dockerignore (docker-py exclude_paths): "
        + ", ".join(sorted({p.split('/')[0] + ('/' if '/' in p else '') for p in context_files})))
    log(f"stage {stage.name!r} (FROM {stage.base}), {len(stage.steps)} instructions")

    # Pass 1, nothing built: every COPY source must be in the context, and every file the
    # stage's sources embed must be in the stage once all of them are copied.
    dry = Replay(root, ctx_dir, context_files, context)
    for ins, value, line, ctx in stage.steps:
        if ins == "WORKDIR":
            dry.workdir = dry.absolute(split_args(value, ctx)[0])
        elif ins in ("COPY", "ADD"):
            flags, sources, dest = copy_parts(value, ctx)
            if "from" in flags:
                raise Unreplayable(f"Dockerfile:{line}: {ins} --from={flags['from']}: the replay has no other stages or images")
            if ins == "ADD" and any(re.match(r"^[a-z]+://|^git@", s) or re.search(r"\.(tar|tgz|gz|bz2|xz|zst)$", s) for s in sources):
                raise Unreplayable(f"Dockerfile:{line}: ADD of a URL or an archive")
            unsupported = set(flags) - {"chown", "chmod", "link"}
            if unsupported:
                raise Unreplayable(f"Dockerfile:{line}: {ins} --{', --'.join(sorted(unsupported))}")
            dry.copy(sources, dest, line, dry=True)
    view = {c: os.path.join(ctx_dir, rel) for c, rel in dry.origin.items()}
    problems = dry.missing_includes(view)
    if problems:
        raise Failed("\n".join(problems))

    key = hashlib.sha256()
    key.update(tool_versions().encode())
    for ins, value, line, ctx in stage.steps:
        key.update(f"{ins} {value} {sorted((ctx.envs or {}).items())} {sorted((ctx.args or {}).items())}\n".encode())
    for line, rel in dry.copies:
        p = os.path.join(ctx_dir, rel)
        key.update(f"{line} {rel} {os.stat(p, follow_symlinks=False).st_mode}\n".encode())
        key.update(os.readlink(p).encode() if os.path.islink(p) else open(p, "rb").read())
    key = key.hexdigest()
    stamp = os.path.join(cache, f"stamp-{stage.name}")
    previous = open(stamp).read().strip() if os.path.exists(stamp) else ""

    # Pass 2: the stage itself.
    target = os.path.join(cache, "target")
    os.makedirs(target, exist_ok=True)
    shutil.rmtree(root, ignore_errors=True)  # a `target` symlink inside is removed, not followed
    os.makedirs(root)
    rp = Replay(root, ctx_dir, context_files, context)
    skip = previous == key and not a.force
    if not skip and os.path.exists(stamp):
        os.unlink(stamp)  # the RUN lines below replace what the stamp vouched for
    t0 = time.monotonic()
    for ins, value, line, ctx in stage.steps:
        if ins == "WORKDIR":
            rp.set_workdir(split_args(value, ctx)[0])
            link = rp.host(os.path.join(rp.workdir, "target"))
            if not os.path.lexists(link):
                os.symlink(target, link)
            log(f"  Dockerfile:{line}: WORKDIR {rp.workdir}  (its target/ -> {target})")
        elif ins in ("COPY", "ADD"):
            _, sources, dest = copy_parts(value, ctx)
            before = len(rp.copies)
            rp.copy(sources, dest, line)
            log(f"  Dockerfile:{line}: {ins} {' '.join(sources)} -> {dest}  ({len(rp.copies) - before} files)")
        elif ins == "RUN":
            command = value.strip()
            while command.startswith("--"):  # BuildKit's --mount=, --network=: nothing to stand in for
                command = command.split(None, 1)[1] if " " in command else ""
            if PACKAGE_MANAGERS.search(command):
                raise Unreplayable(f"Dockerfile:{line}: RUN {command[:80]}: installs packages, which the replay "
                                   "would do to this machine")
            if "cargo" in command:
                problems = rp.missing_includes(rp.host_view())
                if problems:
                    raise Failed("\n".join(problems))
            if skip:
                log(f"  Dockerfile:{line}: RUN {command}  (not run: nothing it reads changed since the last replay)")
                continue
            if command.startswith("["):
                argv = [rp.map_paths(w) for w in json.loads(command)]
            else:
                argv = ["/bin/sh", "-c", rp.map_paths(command)]
            logfile = os.path.join(cache, f"run-{line}.log")
            started = time.monotonic()
            with open(logfile, "w") as out:
                rc = subprocess.run(argv, cwd=rp.host(rp.workdir), env=run_env(ctx), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
            took = time.monotonic() - started
            if rc != 0:
                text = open(logfile, errors="replace").read()
                tail = "\n".join(text.splitlines()[-25:])
                why = diagnose_log(rp, text)
                raise Failed(f"Dockerfile:{line}: RUN {command}\nexited {rc} after {took:.0f}s; its last lines "
                             f"({logfile}):\n{tail}" + ("\n" + "\n".join(why) if why else ""))
            log(f"  Dockerfile:{line}: RUN {command}  (ok, {took:.0f}s)")
        elif ins in ("ENV", "ARG", "LABEL", "USER", "EXPOSE", "CMD", "ENTRYPOINT", "SHELL", "HEALTHCHECK",
                     "STOPSIGNAL", "VOLUME", "ONBUILD"):
            if ins in ("SHELL", "USER", "ONBUILD"):
                raise Unreplayable(f"Dockerfile:{line}: {ins} in the replayed stage")
        else:
            raise Unreplayable(f"Dockerfile:{line}: {ins}")

    # What the final image takes from this stage must exist, and run.
    if not artefacts:
        log("no later stage copies from this one: nothing to run")
    for path, line in artefacts:
        host = rp.host(rp.absolute(path))
        if not os.path.exists(host):
            raise Failed(f"Dockerfile:{line}: COPY --from={stage.name} {path}: the replayed stage has no such file")
        if os.path.isfile(host) and os.access(host, os.X_OK):
            r = subprocess.run([host, "--help"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise Failed(f"{path} --help exited {r.returncode}:\n{(r.stdout + r.stderr)[-2000:]}")
            first = (r.stdout.strip().splitlines() or [""])[0]
            size = os.path.getsize(host) / 1e6
            log(f"{path} ({size:.1f} MB), as Dockerfile:{line} copies it: --help answers: {first}")
        else:
            log(f"{path}: present, as Dockerfile:{line} copies it")
    with open(stamp, "w") as f:
        f.write(key + "\n")
    log(f"builder stage replayed from the build context in {time.monotonic() - t0:.0f}s"
        + (" (RUN lines not run: unchanged since the last replay; --force runs them)" if skip else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as e:
        print(f"docker build would fail:\n{e}")
        sys.exit(1)
    except Unreplayable as e:
        print(f"cannot replay: {e}")
        sys.exit(2)
