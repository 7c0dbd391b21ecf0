"""Run ``poisonflow <stage>`` jobs in forks of one warm process that has imported torch once.

Every workflow job is its own process, and on small jobs importing torch and torchvision (about
9 s of CPU and 0.9 GiB) costs more than the work. With ``workflow: {group_small_jobs: true}`` in
the config the rules run ``python -m poisonflow.warm <stage> <arguments>`` instead of
``poisonflow <stage> <arguments>``: this client hands its command line, working directory,
environment and standard streams (the job's log file) to a server process that has imported the
heavy third-party modules (:data:`PRELOAD`, never ``poisonflow`` itself, so edits to the package
are seen by the next job) and forks a child per job. The child runs ``poisonflow.cli.main`` exactly
as the command would (GPU claim included) and its exit status becomes the client's. Each job keeps
its own outputs, log, code hash and caching; only the start-up is shared.

The first client starts the server (``python -m poisonflow.warm --serve``) and waits for it; the
server leaves when idle for ``POISONFLOW_WARM_IDLE`` seconds (default 300) or when the workflow
ends (the Snakefile stops it). A signal to the client (Snakemake cancelling a job) is forwarded to
the child, and a client that dies kills its child. When no server can be started the client runs
the job itself, as ``poisonflow`` would. The server is per user, Python environment and package
checkout (its socket is in ``$XDG_RUNTIME_DIR`` or the temporary directory).

Not for clusters: there each job runs on its own node; group jobs there with ``group:`` instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Third-party modules the server imports once (those the stages import; a missing one is skipped).
PRELOAD = ("numpy", "torch", "torchvision", "torch.nn.functional", "zarr", "numcodecs", "pandas",
           "scipy.ndimage", "sklearn.model_selection", "sklearn.metrics", "yaml", "jsonschema")
ENV_IDLE = "POISONFLOW_WARM_IDLE"
DEFAULT_IDLE = 300.0
START_TIMEOUT = 180.0
MAX_SOCKET_PATH = 100  # bytes; the server binds a slightly longer temporary name first
_HEADER = struct.Struct("!I")


# -- where the server listens -------------------------------------------------------------------

def socket_path() -> Path:
    """One server per user, interpreter, environment, package checkout and torch installation."""
    torch = importlib.util.find_spec("torch")
    torch_file = torch.origin if torch is not None and torch.origin else ""
    stamp = os.stat(torch_file).st_mtime_ns if torch_file else 0
    key = "\0".join([sys.executable, sys.prefix, str(Path(__file__).resolve().parent), torch_file, str(stamp)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = f"poisonflow-warm-{os.getuid()}-{digest}.sock"
    root = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    if len(str(Path(root) / name)) > MAX_SOCKET_PATH:  # a Unix socket's path is at most 107 bytes
        root = "/tmp"
    return Path(root) / name


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    payload = _HEADER.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], fds)
    else:
        sock.sendall(payload)


def _receive(sock: socket.socket, with_fds: bool = False) -> tuple[dict | None, list[int]]:
    """One message (and the file descriptors sent with it); (None, []) at end of stream."""
    fds: list[int] = []
    if with_fds:
        chunk, fds, _, _ = socket.recv_fds(sock, 1 << 16, 8)
    else:
        chunk = sock.recv(1 << 16)
    if not chunk:
        return None, fds
    buffer = bytearray(chunk)
    while len(buffer) < _HEADER.size:
        more = sock.recv(1 << 16)
        if not more:
            return None, fds
        buffer += more
    (size,) = _HEADER.unpack(buffer[:_HEADER.size])
    while len(buffer) < _HEADER.size + size:
        more = sock.recv(1 << 16)
        if not more:
            return None, fds
        buffer += more
    return json.loads(buffer[_HEADER.size:_HEADER.size + size]), fds


# -- the client ---------------------------------------------------------------------------------

def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def _start_server(path: Path) -> socket.socket | None:
    """Connect, starting the server first if none answers (one client starts it; the others wait)."""
    sock = _connect(path)
    if sock is not None:
        return sock
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)
        if sock is not None:
            return sock
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        with open(f"{path}.log", "a") as log:
            server = subprocess.Popen([sys.executable, "-m", "poisonflow.warm", "--serve", str(path)],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                      close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and server.poll() is None:  # a server that died: give up now
            sock = _connect(path)
            if sock is not None:
                return sock
            time.sleep(0.1)
    return None


def run_job(argv: list[str]) -> int:
    """Run ``poisonflow <argv>`` in a fork of the warm server; its exit status."""
    path = socket_path()
    sock = _start_server(path)
    if sock is None:
        print(f"poisonflow.warm: no warm server at {path} (see {path}.log); running the job in this process",
              file=sys.stderr, flush=True)
        return _run_here(argv)
    with sock:
        _send(sock, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}, [0, 1, 2])
        reply, _ = _receive(sock)
        if reply is None or "pid" not in reply:
            print("poisonflow.warm: the warm server refused the job", file=sys.stderr, flush=True)
            return 1
        child = int(reply["pid"])

        def forward(signum, frame):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)
        while True:
            try:
                reply, _ = _receive(sock)
                break
            except InterruptedError:
                continue
        if reply is None or "status" not in reply:
            print("poisonflow.warm: lost the warm server before the job ended", file=sys.stderr, flush=True)
            return 1
        return int(reply["status"])


def _run_here(argv: list[str]) -> int:
    from .cli import main

    return main(argv)


def stop() -> bool:
    """Ask the server of this environment to leave once its jobs are done; whether one answered."""
    sock = _connect(socket_path())
    if sock is None:
        return False
    with sock:
        _send(sock, {"stop": True})
    return True


# -- the server ---------------------------------------------------------------------------------

def _preload() -> None:
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() must not initialise CUDA
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a fork could not use CUDA then
        raise RuntimeError("CUDA was initialised while preloading; the warm server cannot fork jobs")


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the job's process and run it; never returns."""
    code = 1
    import atexit

    atexit._clear()  # the server's exit handlers are not the job's; the job's own run at its end
    try:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import random

        random.seed()
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.seed()
        # the job imports the package from disk, edits included; and tqdm afresh, since it reads
        # its TQDM_* settings from the environment when imported
        for name in [name for name in sys.modules if name.split(".")[0] in ("poisonflow", "tqdm")]:
            if name != __name__:
                del sys.modules[name]
        sys.argv = ["poisonflow", *request["argv"]]
        from poisonflow.cli import main

        code = main(list(request["argv"]))
    except SystemExit as error:
        code = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
        if not isinstance(error.code, int) and error.code is not None:
            print(error.code, file=sys.stderr)
    except BaseException:  # as the interpreter would: the traceback goes to the job's log
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()  # as at the end of a process (e.g. the GPU claim's trace)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def serve(path: Path) -> None:
    """Preload, listen on ``path`` and fork one child per job until idle or asked to stop."""
    _preload()
    idle_limit = float(os.environ.get(ENV_IDLE, DEFAULT_IDLE))
    tmp = path.with_name(f".{os.getpid()}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp))
    listener.listen(64)
    os.replace(tmp, path)  # clients see the socket only once it is ready
    inode = path.stat().st_ino
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, tuple[socket.socket, float | None]] = {}  # pid → (client, when SIGTERM was sent)
    last_activity, stopping = time.monotonic(), False
    print(f"{time.strftime('%H:%M:%S')} warm server {os.getpid()} listening on {path}", flush=True)
    while True:
        for key, _ in selector.select(timeout=0.5):
            if key.fileobj is listener:
                client, _ = listener.accept()
                last_activity = time.monotonic()
                request, fds = _receive(client, with_fds=True)
                if request is None or request.get("stop"):
                    stopping = stopping or bool(request and request.get("stop"))
                    for fd in fds:
                        os.close(fd)
                    client.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    client.close()
                    for other, _ in children.values():
                        other.close()
                    _child(request, fds)
                for fd in fds:
                    os.close(fd)
                try:
                    _send(client, {"pid": pid})
                except OSError:
                    pass
                children[pid] = (client, None)
                selector.register(client, selectors.EVENT_READ, pid)
            else:  # a client closed its connection before its job ended: end the job
                pid = key.data
                selector.unregister(key.fileobj)
                if pid in children and children[pid][1] is None:
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                    children[pid] = (children[pid][0], time.monotonic())
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            client, _ = children.pop(pid, (None, None))
            last_activity = time.monotonic()
            if client is not None:
                code = os.waitstatus_to_exitcode(status)
                try:
                    _send(client, {"status": code if code >= 0 else 128 - code})
                except OSError:
                    pass
                try:
                    selector.unregister(client)
                except (KeyError, ValueError):
                    pass
                client.close()
        for pid, (client, terminated) in list(children.items()):
            if terminated is not None and time.monotonic() - terminated > 10:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not children and (stopping or time.monotonic() - last_activity > idle_limit):
            break
    try:
        if path.stat().st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass
    print(f"{time.strftime('%H:%M:%S')} warm server {os.getpid()} leaving", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--serve"]:
        serve(Path(argv[1]))
        return 0
    if argv[:1] == ["--stop"]:
        return 0 if stop() else 1
    return run_job(argv)


if __name__ == "__main__":
    sys.exit(main())
