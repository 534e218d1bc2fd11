"""The services can serve TLS: a client that trusts the certificate gets through, plaintext doesn't."""

import secrets
import subprocess
from pathlib import Path

import grpc
import pytest

from fuseloop.bus.url import open_bus
from fuseloop.tls import TlsConfig
from fuseloop.v1 import events_pb2, feedback_pb2_grpc
from services.feedback.server import FeedbackServer, FeedbackServiceConfig


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_feedback_service_over_tls(certificate, tmp_path):
    cert, key = certificate
    bus = open_bus(f"sqlite:///{tmp_path / 'bus.db'}")
    config = FeedbackServiceConfig(app_tokens={"tok": "app"}, pseudonym_key=secrets.token_bytes(32), port=0,
                                   tls=TlsConfig(cert, key))
    event = events_pb2.FeedbackEvent(schema_version=1, event_id="e1", response_id="r1", session_id="s1",
                                     thumbs=events_pb2.Thumbs(up=True))
    with FeedbackServer(config, bus) as server:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{server.port}", creds) as channel:
            reply = feedback_pb2_grpc.FeedbackServiceStub(channel).Submit(
                event, timeout=10, metadata=[("authorization", "Bearer tok")])
            assert reply.event_id == "e1"
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                feedback_pb2_grpc.FeedbackServiceStub(channel).Submit(
                    event, timeout=5, metadata=[("authorization", "Bearer tok")])
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    bus.close()


def test_inference_service_over_tls(certificate, shared_repo_dir, tmp_path):
    from fuseloop.repository import ModelRepository
    from fuseloop.v1 import admin_pb2, admin_pb2_grpc
    from services.inference.config import InferenceServiceConfig
    from services.inference.runtime.onnx_runtime import OnnxRuntime
    from services.inference.server import InferenceServer, ServerThread

    cert, key = certificate
    config = InferenceServiceConfig(port=0, admin_token="admin", tls=TlsConfig(cert, key))
    server = ServerThread(InferenceServer(config, OnnxRuntime(), ModelRepository(shared_repo_dir),
                                          state_path=tmp_path / "serving.json")).start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{server.server.port}", creds) as channel:
            status = admin_pb2_grpc.AdminServiceStub(channel).Status(
                admin_pb2.StatusRequest(), timeout=10, metadata=[("authorization", "Bearer admin")])
            assert status.ready
    finally:
        server.stop()


def test_mutual_tls_lets_in_only_clients_with_a_certificate_from_the_client_ca(tmp_path):
    """The README's example: --tls-cert/--tls-key for the server, --tls-client-ca for mTLS."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=fuseloop-ca",
            "-keyout", "ca.key", "-out", "ca.pem")
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr")
        (tmp_path / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    read = lambda name: (tmp_path / name).read_bytes()  # noqa: E731
    bus = open_bus(f"sqlite:///{tmp_path / 'bus.db'}")
    config = FeedbackServiceConfig(app_tokens={"tok": "app"}, pseudonym_key=secrets.token_bytes(32), port=0,
                                   tls=TlsConfig(tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"))
    event = events_pb2.FeedbackEvent(schema_version=1, event_id="e1", response_id="r1", session_id="s1",
                                     thumbs=events_pb2.Thumbs(up=True))
    with FeedbackServer(config, bus) as server:
        with_cert = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
        with grpc.secure_channel(f"localhost:{server.port}", with_cert) as channel:
            assert feedback_pb2_grpc.FeedbackServiceStub(channel).Submit(
                event, timeout=10, metadata=[("authorization", "Bearer tok")]).event_id == "e1"
        without = grpc.ssl_channel_credentials(read("ca.pem"))
        with grpc.secure_channel(f"localhost:{server.port}", without) as channel:
            with pytest.raises(grpc.RpcError) as err:
                feedback_pb2_grpc.FeedbackServiceStub(channel).Submit(
                    event, timeout=5, metadata=[("authorization", "Bearer tok")])
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    bus.close()
