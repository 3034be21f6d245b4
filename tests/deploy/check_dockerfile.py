#!/usr/bin/python3
"""Checks the Dockerfile without a Docker engine: it must build the way CI does.

CI (.ci/run -> scripts/test.sh) installs with scripts/install-deps.sh and builds with
scripts/build.sh. The builder stage must run exactly those commands (install-deps.sh may be
limited to its "build" group, build.sh may get extra -D cache options, e.g. the GPU
architectures) and nothing else that installs or compiles, so the image cannot drift from what
CI tests. The bases are build arguments: by default they must be NVIDIA's CUDA images (the CUDA
image); CI's scripts/container-check.sh overrides them to build and run the CPU image. The
builder must build the kvserve and kvserve-cli targets and pass KVSERVE_CUDA through. The
runtime stage must install only the package list that scripts/runtime-packages.sh derived from
the binaries, and keep the contract of docs/design.md and docs/deploy.md:
exec-form `kvserve serve` entrypoint, non-root, /models volume, ports 50051 and 9464, and a
health check through `kvserve-cli health`.

With --binary, also runs scripts/runtime-packages.sh on that binary here (Debian 12), which must
name installed packages only.
"""
import argparse
import json
import pathlib
import re
import shlex
import subprocess
import sys

import yaml

CUDA_BASE = re.compile(r"nvidia/cuda:(13\.\d+\.\d+)-(devel|runtime)-ubuntu24\.04")
HEALTH = ["kvserve-cli", "health", "--addr", "127.0.0.1:50051"]

errors = []


def check(condition, message):
    if not condition:
        errors.append(message)
    return condition


def instructions(text):
    """[(stage, KEYWORD, arguments)] with continuation lines joined and comments dropped.
    Instructions before the first FROM (global ARGs) are stage -1."""
    result, stage, pending = [], -1, ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, arguments = pending.strip().partition(" ")
            keyword = keyword.upper()
            stage += keyword == "FROM"
            result.append((stage, keyword, " ".join(arguments.split())))
        pending = ""
    return result


def run_command(arguments):
    """A RUN's shell command without its BuildKit flags (--mount=..., --network=...)."""
    words = arguments.split(" ")
    while words and words[0].startswith("--"):
        words.pop(0)
    return " ".join(words)


def ci_commands(root):
    """The scripts/ commands that CI's entry point runs, in order."""
    check("scripts/test.sh" in (root / ".ci" / "run").read_text(), ".ci/run no longer runs scripts/test.sh")
    return [line.strip() for line in (root / "scripts" / "test.sh").read_text().splitlines()
            if line.strip().startswith("scripts/")]


def arg_defaults(stage):
    """{name: default} of a stage's ARG instructions (quotes removed)."""
    defaults = {}
    for keyword, arguments in stage:
        if keyword == "ARG":
            name, _, value = arguments.partition("=")
            defaults[name] = shlex.split(value)[0] if value else ""
    return defaults


def substitute(text, defaults):
    """${NAME} and $NAME replaced by the ARG defaults, as the builder would without --build-arg."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), text)


def check_builder(stage, ci):
    runs = [run_command(a) for k, a in stage if k == "RUN"]
    defaults = arg_defaults(stage)
    install = [c for c in ci if c.split()[0] == "scripts/install-deps.sh"]
    build = [c for c in ci if c.split()[0] == "scripts/build.sh"]
    if not check(install and build, f"scripts/test.sh no longer runs install-deps.sh and build.sh: {ci}"):
        return
    check(set(defaults.get("KVSERVE_BUILD_TARGETS", "").split()) == {"kvserve", "kvserve-cli"},
          "builder: ARG KVSERVE_BUILD_TARGETS must name the kvserve and kvserve-cli targets (build.sh reads it)")
    check(defaults.get("KVSERVE_CUDA") == "ON", "builder: ARG KVSERVE_CUDA must default to ON (the CUDA image)")
    order = []
    for command in runs:
        words = shlex.split(command)
        if words == shlex.split(install[0]) + ["build"]:
            order.append("install")
        elif words[:len(shlex.split(build[0]))] == shlex.split(build[0]):
            extra = words[len(shlex.split(build[0])):]
            check(all(w.startswith("-D") for w in extra),
                  f"builder: {command!r} passes build.sh more than -D cache options")
            check("-DKVSERVE_CUDA=${KVSERVE_CUDA}" in extra, f"builder: {command!r} must pass -DKVSERVE_CUDA=${{KVSERVE_CUDA}}")
            order.append("build")
        elif words[0] == "scripts/runtime-packages.sh":
            order.append("packages")
        else:
            errors.append(f"builder: {command!r} is not a command CI runs (install with "
                          "scripts/install-deps.sh build, build with scripts/build.sh)")
    check(order == ["install", "build", "packages"],
          f"builder must run install-deps.sh, build.sh, runtime-packages.sh once each in that order, runs {order}")


def check_runtime(stage, root):
    runs = [run_command(a) for k, a in stage if k == "RUN"]
    for command in runs:
        for segment in re.split(r"&&|;|\|", command):
            words = shlex.split(segment)
            if "install" in words and any(w in ("apt-get", "apt") for w in words):
                check("runtime-packages.txt" in segment and
                      all(w.startswith("-") for w in words[words.index("install") + 1:]),
                      f"runtime: {segment.strip()!r} installs packages not derived by scripts/runtime-packages.sh")
    values = {}
    for keyword, arguments in stage:
        values.setdefault(keyword, []).append(arguments)

    def exec_form(keyword):
        try:
            return json.loads(values.get(keyword, ["null"])[-1])
        except json.JSONDecodeError:
            return None

    check(exec_form("ENTRYPOINT") == ["kvserve", "serve"],
          'runtime: ENTRYPOINT must be the exec form ["kvserve", "serve"] so SIGTERM reaches kvserve')
    check(exec_form("CMD") == ["--model", "/models/gpt2"], 'runtime: CMD must be ["--model", "/models/gpt2"]')
    check("/models" in " ".join(values.get("VOLUME", [])).split(), "runtime: no VOLUME /models")
    check({"50051", "9464"} <= set(" ".join(values.get("EXPOSE", [])).split()), "runtime: must EXPOSE 50051 9464")
    health = values.get("HEALTHCHECK", [""])[-1]
    command = health.partition(" CMD ")[2]
    check(command.startswith("[") and json.loads(command) == HEALTH,
          f"runtime: HEALTHCHECK must run {HEALTH} in exec form")
    user = values.get("USER", ["0"])[-1].split(":")[0]
    if check(user.isdigit() and int(user) != 0, "runtime: USER must be a numeric non-root uid"):
        deployment = yaml.safe_load((root / "deploy" / "k8s" / "deployment.yaml").read_text())
        run_as = deployment["spec"]["template"]["spec"]["securityContext"].get("runAsUser")
        check(run_as == int(user), f"deploy/k8s/deployment.yaml runAsUser {run_as} is not the image's uid {user}")
    copied = " ".join(a for k, a in stage if k == "COPY" and a.startswith("--from=builder"))
    for binary in ("build/bin/kvserve ", "build/bin/kvserve-cli "):
        check(binary in copied, f"runtime: does not copy {binary.strip()} from the builder")


def check_runtime_packages(root, binary):
    result = subprocess.run([str(root / "scripts" / "runtime-packages.sh"), binary],
                            capture_output=True, text=True)
    if not check(result.returncode == 0, f"runtime-packages.sh {binary} failed: {result.stderr.strip()}"):
        return
    packages = result.stdout.split()
    check("libstdc++6" in packages, f"runtime-packages.sh {binary}: libstdc++6 missing from {packages}")
    for package in packages:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
        check(status.stdout == "install ok installed", f"runtime-packages.sh named {package!r}, not an installed package")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=pathlib.Path, help="the repository root")
    parser.add_argument("--binary", help="a built binary to run scripts/runtime-packages.sh on")
    args = parser.parse_args()
    root = args.root

    parsed = instructions((root / "Dockerfile").read_text())
    stages = [[(k, a) for s, k, a in parsed if s == i] for i in range(max(s for s, _, _ in parsed) + 1)]
    bases = arg_defaults([(k, a) for s, k, a in parsed if s == -1])
    if check(len(stages) == 2, f"Dockerfile must have two stages (builder, runtime), has {len(stages)}"):
        check(stages[0][0][1] == "${BUILDER_IMAGE} AS builder" and stages[1][0][1] == "${RUNTIME_IMAGE}",
              "the stages must start FROM ${BUILDER_IMAGE} AS builder and FROM ${RUNTIME_IMAGE} "
              "(build arguments, so the CPU image is built from this same file)")
        builder_from = CUDA_BASE.fullmatch(substitute(stages[0][0][1], bases).split(" AS ")[0])
        runtime_from = CUDA_BASE.fullmatch(substitute(stages[1][0][1], bases))
        check(builder_from and builder_from.group(2) == "devel" and stages[0][0][1].endswith(" AS builder"),
              "ARG BUILDER_IMAGE must default to nvidia/cuda:13.x.y-devel-ubuntu24.04")
        check(runtime_from and runtime_from.group(2) == "runtime",
              "ARG RUNTIME_IMAGE must default to nvidia/cuda:13.x.y-runtime-ubuntu24.04 (cuBLAS included)")
        check(builder_from and runtime_from and builder_from.group(1) == runtime_from.group(1),
              "builder and runtime must use the same CUDA release")
        check_builder(stages[0], ci_commands(root))
        check_runtime(stages[1], root)

    ignored = set((root / ".dockerignore").read_text().split())
    for entry in (".git", "build*", ".device"):
        check(entry in ignored, f".dockerignore must exclude {entry}")
    if args.binary:
        check_runtime_packages(root, args.binary)

    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"Dockerfile: {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
