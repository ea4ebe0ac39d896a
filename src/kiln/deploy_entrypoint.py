"""The Docker image's entrypoint: `kiln serve` on the mounted engine by default, any kiln command on request.

    (no arguments), `serve [FLAGS]`, `--FLAG ...`   kiln serve on $KILN_ENGINE_DIR (/engine) and
                                                  $KILN_TOKENIZER_DIR (/tokenizer), 0.0.0.0:$PORT
    `run ...`, `build ...`, any kiln subcommand     kiln SUBCOMMAND ..., as given
    `kiln ...`, `--help`, `--version`               kiln ..., as given
    anything else (`bash`, `nvidia-smi`)            that program, as given
    `--healthcheck`                                 probe /v2/health/ready (the image's HEALTHCHECK)

Before serving it checks what is mounted, so that a forgotten `-v` or `--gpus all` gets one line saying
what to add (exit status 2) instead of a traceback from deep inside the engine loader. It then replaces
itself with the command (exec), so the server is the container's main process and receives its signals.

It is Python rather than a shell script because `KILN_SERVE_ARGS` needs shell-style splitting with
quotes, which POSIX sh cannot do safely, and because the command it builds is a plain list that the
tests compare with what `kiln serve`'s own parser accepts.

The API key is never put on the command line (where `ps` and `docker top` show it to anyone on the
host): `kiln serve` reads $KILN_API_KEY itself, and the environment passes through exec unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from kiln.errors import KilnError

ENGINE_MOUNT = "/engine"
TOKENIZER_MOUNT = "/tokenizer"
DEFAULT_PORT = "8000"
HEALTH_PATH = "/v2/health/ready"
HEALTH_TIMEOUT_S = 4.0
# A Hugging Face tokenizer folder holds at least one of these (those of every family kiln supports do).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# Present in a container only when the NVIDIA runtime gave it GPUs (`--gpus`, or compose's reservation).
NVIDIA_CONTROL_DEVICE = Path("/dev/nvidiactl")
RUN_HINT = ("docker run --gpus all -v /path/to/engine:/engine:ro -v /path/to/hf-model:/tokenizer:ro "
            "-p 8000:8000 kiln")


def kiln_subcommands() -> set[str]:
    """The subcommands `kiln` has, read from its own parser so that a new one needs no change here."""
    from kiln.cli import make_parser

    for action in make_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value given to `flag` in `args` (`--flag VALUE` or `--flag=VALUE`; the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def user_serve_flags(extra: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """$KILN_SERVE_ARGS, split as a shell would, then the container's arguments (which win over it)."""
    text = env.get("KILN_SERVE_ARGS", "")
    try:
        from_env = shlex.split(text)
    except ValueError as e:
        raise KilnError(f"KILN_SERVE_ARGS={text!r} cannot be split into flags ({e}): "
                        "close the quote, or quote the value as a shell would") from None
    return [*from_env, *extra]


def serve_settings(flags: Sequence[str], env: Mapping[str, str]) -> dict[str, str]:
    """Each serve flag the container sets by itself, with its value: an explicit flag, else the
    environment, else the image's default. A flag the user gave is kept where the user put it."""
    defaults = {
        "--engine_dir": env.get("KILN_ENGINE_DIR") or ENGINE_MOUNT,
        "--tokenizer_dir": env.get("KILN_TOKENIZER_DIR") or TOKENIZER_MOUNT,
        "--host": "0.0.0.0",
        "--port": env.get("PORT") or DEFAULT_PORT,
    }
    if env.get("KILN_SERVED_MODEL_NAME"):
        defaults["--served_model_name"] = env["KILN_SERVED_MODEL_NAME"]
    return {flag: flag_value(flags, flag) or default for flag, default in defaults.items()}


def serve_command(extra: Sequence[str], env: Mapping[str, str]) -> list[str]:
    flags = user_serve_flags(extra, env)
    settings = serve_settings(flags, env)
    command = ["kiln", "serve"]
    for flag, value in settings.items():
        if flag_value(flags, flag) is None:
            command += [flag, value]
    command += flags
    if not {"-h", "--help"} & set(flags):
        check_mounts(Path(settings["--engine_dir"]), Path(settings["--tokenizer_dir"]))
    return command


def command_for(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The command the container runs for its arguments `argv`; a KilnError when a mount is missing."""
    if argv and argv[0] in ("-h", "--help", "--version"):
        return ["kiln", *argv]
    if not argv or argv[0] == "serve" or argv[0].startswith("-"):
        return serve_command(argv[1:] if argv and argv[0] == "serve" else argv, env)
    if argv[0] == "kiln":
        return list(argv)
    if argv[0] in kiln_subcommands():
        return ["kiln", *argv]
    return list(argv)


def listing(folder: Path, what: str) -> list[str]:
    """The names in a mounted folder, or a KilnError saying why there is nothing to read."""
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise KilnError(f"{what} {folder} is a file: mount a folder there") from None
    except PermissionError:
        raise KilnError(
            f"{what} {folder} is not readable by this container's user (uid {os.getuid()}): make it "
            "readable on the host (chmod -R a+rX FOLDER), or run the container with --user $(id -u):$(id -g)"
        ) from None


def check_mounts(engine_dir: Path, tokenizer_dir: Path) -> None:
    check_engine(engine_dir)
    check_tokenizer(tokenizer_dir, engine_dir)
    check_gpu(engine_dir)


def check_engine(folder: Path) -> None:
    names = listing(folder, "engine folder")
    if "engine.json" in names:
        return
    state = "does not exist" if not folder.exists() else "is empty" if not names else "holds no engine.json"
    inside = sorted(n for n in names if (folder / n / "engine.json").is_file())
    hint = f"; it has engine folders inside: mount one of them ({', '.join(inside)}) instead" if inside else ""
    raise KilnError(
        f"engine folder {folder} {state}{hint}: mount the folder `kiln build` wrote (the one with "
        f"engine.json) at {folder}, read-only, e.g. `{RUN_HINT}`, or point KILN_ENGINE_DIR at it"
    )


def check_tokenizer(folder: Path, engine_dir: Path) -> None:
    names = listing(folder, "tokenizer folder")
    if any(name in names for name in TOKENIZER_FILES):
        return
    state = "does not exist" if not folder.exists() else "is empty" if not names else "holds no tokenizer"
    in_engine = any((engine_dir / name).is_file() for name in TOKENIZER_FILES)
    hint = f"; the engine folder has one: set KILN_TOKENIZER_DIR={engine_dir}" if in_engine else ""
    raise KilnError(
        f"tokenizer folder {folder} {state} (none of {', '.join(TOKENIZER_FILES)}){hint}: mount the "
        f"Hugging Face model folder the engine was built from at {folder}, read-only, e.g. `{RUN_HINT}`, "
        "or point KILN_TOKENIZER_DIR at it"
    )


def check_gpu(engine_dir: Path) -> None:
    """A GPU engine in a container that was given no GPU: the usual forgotten `--gpus all`."""
    try:
        device = json.loads((engine_dir / "engine.json").read_text()).get("device") or {}
    except (OSError, ValueError, AttributeError):
        return  # kiln serve reports a damaged engine.json itself
    if not isinstance(device, dict) or device.get("type") != "cuda" or NVIDIA_CONTROL_DEVICE.exists():
        return
    raise KilnError(
        f"the engine in {engine_dir} was built for a GPU ({device.get('name', 'cuda')}) but this container "
        "sees none: start it with `--gpus all` (docker run) or with docker/compose.yaml's GPU reservation; "
        "both need the NVIDIA Container Toolkit on the host (docs/docker.md)"
    )


def healthcheck(env: Mapping[str, str]) -> int:
    """0 when the server on this container's port answers 200 on /v2/health/ready, else 1."""
    settings = serve_settings(user_serve_flags([], env), env)
    url = f"http://127.0.0.1:{settings['--port']}{HEALTH_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:
        print(f"unhealthy: {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    if argv == ["--healthcheck"]:
        return healthcheck(env)
    try:
        command = command_for(argv, env)
    except KilnError as e:
        print(f"kiln container: error: {e}", file=sys.stderr)
        return 2
    if command[0] == "kiln":
        print(f"[kiln] {shlex.join(command)}", file=sys.stderr, flush=True)
    try:
        os.execvp(command[0], command)
    except OSError as e:
        print(f"kiln container: error: cannot run {command[0]!r}: {e.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
