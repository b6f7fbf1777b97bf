"""Deployment on real processes: a development PKI, a TLS SuperLink with SuperNode authentication, registration.

Everything here drives Flower 1.42's own executables and CLI; nothing private:

* ``flower-superlink`` serves its Fleet, Control and Runtime APIs over HTTPS on **one** port (``--host``,
  ``--port``), with the certificate given by ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``.
  ``--enable-supernode-auth`` admits only SuperNodes whose public key was registered; an unregistered
  SuperNode logs Flower's exit code 305 ("Failed to activate SuperNode") and exits with status 1.
* Public keys are registered with ``flwr supernode register KEY CONNECTION`` against the Control API; the
  connection is a ``[superlink.<name>]`` table (``address``, ``root-certificates``) in
  ``$FLWR_HOME/config.toml``. The same connection serves ``flwr run <app> <name> --stream``.
* Node keys are EC keys on a NIST curve (P-384 here): the SuperNode reads an OpenSSH-format private key
  (``--auth-supernode-private-key``), the CLI an OpenSSH-format public key (``ecdsa-sha2-nistp384 ...``).
* ``--disable-runtime-dependency-installation`` keeps the SuperLink from resolving the app's dependencies
  with uv (ours lists none; the ServerApp runs in the SuperLink's own environment).

The ServerApp runs on the SuperLink's machine (a ``flwr-serverapp`` subprocess of Flower's SuperExec), so
the run config's ``workdir`` must be an absolute path there holding the held-out speakers.

Example::

    >>> certs = make_dev_certificates(Path("pki"))
    >>> keys = make_node_keys(Path("pki"), 2)
    >>> link = start_superlink(certs=Path("pki"), port=9443, state_dir=Path("state"))
    >>> wait_until_listening(link, "127.0.0.1", 9443)
    >>> home = write_flower_config(Path("state/flwr"), address="127.0.0.1:9443", root_cert=certs.ca_cert)
    >>> register_supernodes([k.public_key for k in keys], flwr_home=home)
    >>> stop_process(link)
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.console import fail
from shared.processes import interrupt, stop_tree

__all__ = [
    "CONNECTION_NAME",
    "DeployError",
    "DevCertificates",
    "NodeKeyPair",
    "flower_env",
    "make_dev_certificates",
    "make_node_keys",
    "register_supernodes",
    "server_cli",
    "start_superlink",
    "stop_process",
    "wait_until_listening",
    "write_flower_config",
]

CONNECTION_NAME = "chorus"  # the [superlink.<name>] entry written by write_flower_config
_CERT_DAYS = 30  # development certificates: short-lived on purpose
_TLS_CURVE = ec.SECP256R1()  # P-256: every TLS stack accepts it
_NODE_CURVE = ec.SECP384R1()  # P-384: the curve Flower's SuperNode-authentication guide uses


class DeployError(RuntimeError):
    """A deployment step failed; the message names the command, file or port."""


@dataclass(frozen=True)
class DevCertificates:
    """PEM files of a development CA and the SuperLink's server certificate signed by it."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyPair:
    """One SuperNode's authentication keys: OpenSSH private key and OpenSSH public key."""

    private_key: Path
    public_key: Path


# -- keys and certificates ----------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(data)


def _pem_pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` as an unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """The CA signs certificates; the server's EC key signs (ECDSA) and agrees on keys (ECDHE)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_dev_certificates(
    out: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1"), *, days: int = _CERT_DAYS
) -> DevCertificates:
    """A self-signed development CA and a SuperLink server certificate for ``hosts`` (its SANs).

    Writes ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` (keys mode 0600) into ``out``. For
    development and tests only: a production SuperLink needs a certificate from the operator's own CA.
    """
    if not hosts:
        raise DeployError("make_dev_certificates needs at least one host name or IP address for the SAN")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(_TLS_CURVE)
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Chorus development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Chorus development CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(_TLS_CURVE)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    certs = DevCertificates(
        ca_cert=out / "ca.crt", ca_key=out / "ca.key", server_cert=out / "server.pem", server_key=out / "server.key"
    )
    certs.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(certs.ca_key, _pem_pkcs8(ca_key))
    certs.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(certs.server_key, _pem_pkcs8(server_key))
    return certs


def make_node_keys(out: Path, n: int, *, prefix: str = "supernode") -> list[NodeKeyPair]:
    """``n`` SuperNode authentication key pairs: ``<prefix>-<i>.key`` (OpenSSH EC P-384 private key, mode 0600)
    and ``<prefix>-<i>.pub`` (``ecdsa-sha2-nistp384 ...``), as ``ssh-keygen -t ecdsa -b 384`` writes them."""
    if n < 0:
        raise DeployError(f"number of SuperNode key pairs must be >= 0, got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in range(n):
        key = ec.generate_private_key(_NODE_CURVE)
        pair = NodeKeyPair(private_key=out / f"{prefix}-{index}.key", public_key=out / f"{prefix}-{index}.pub")
        _write_private(
            pair.private_key,
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        pair.public_key.write_bytes(public + f" chorus-{prefix}-{index}\n".encode())
        pairs.append(pair)
    return pairs


def _certificates_in(certs: Path) -> DevCertificates:
    certs = Path(certs).expanduser().resolve()
    found = DevCertificates(
        ca_cert=certs / "ca.crt", ca_key=certs / "ca.key", server_cert=certs / "server.pem", server_key=certs / "server.key"
    )
    for path in (found.ca_cert, found.server_cert, found.server_key):
        if not path.is_file():
            raise DeployError(f"{path} is missing: create the certificates with `chorus server certs --out {certs}`")
    return found


# -- processes ----------------------------------------------------------------------------------------------


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The environment for Flower's executables: this interpreter's scripts first on PATH (the SuperLink
    starts ``flower-superexec`` and ``flwr-serverapp`` by name) and, if given, ``FLWR_HOME``."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    return env


def _flower_executable(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` is not installed in {Path(sys.executable).parent} or on PATH (pip install flwr)")
    return found


def start_superlink(
    *,
    certs: Path,
    port: int,
    state_dir: Path,
    host: str = "127.0.0.1",
    supernode_auth: bool = True,
    log_file: Path | None = None,
    flwr_home: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``flower-superlink`` with TLS (the files of ``make_dev_certificates`` in ``certs``) and, by
    default, SuperNode authentication; one HTTPS port serves the Fleet, Control and Runtime APIs.

    The SuperLink's state lives in ``state_dir/superlink.db``; its output goes to ``log_file`` (default
    ``state_dir/superlink.log``). It runs in its own session, so :func:`stop_process` can stop it and
    everything it started. Returns at once: call :func:`wait_until_listening` before using it.
    """
    found = _certificates_in(Path(certs))
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_file) if log_file is not None else state_dir / "superlink.log"
    cmd = [
        _flower_executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(found.ca_cert),
        "--ssl-certfile",
        str(found.server_cert),
        "--ssl-keyfile",
        str(found.server_key),
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(state_dir / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    with log_path.open("ab") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=flower_env(flwr_home or state_dir / "flwr"),
            cwd=state_dir,
            start_new_session=True,
        )


def _program(proc: subprocess.Popen[bytes]) -> str:
    """The name of the program ``proc`` runs (its command line is a list, as this module starts them)."""
    args = proc.args
    return Path(str(args[0] if isinstance(args, (list, tuple)) else args)).name


def wait_until_listening(
    proc: subprocess.Popen[bytes], host: str, port: int, *, timeout: float = 60.0, log_file: Path | None = None
) -> None:
    """Block until ``host:port`` accepts TCP connections; DeployError if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    hint = f"; see {log_file}" if log_file is not None else ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"{_program(proc)} exited with {proc.returncode} before listening on {host}:{port}{hint}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise DeployError(f"nothing listens on {host}:{port} after {timeout:.0f} s{hint}")


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> int | None:
    """Stop ``proc`` and every process it started (Flower detaches its SuperExec and app processes into
    sessions of their own, so a process group is not enough): SIGTERM, then SIGKILL after ``timeout``.
    Returns the exit status of ``proc`` (None if it could not be reaped)."""
    return stop_tree(proc, timeout)


# -- Flower configuration and registration ------------------------------------------------------------------


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_flower_config(
    flwr_home: Path, *, address: str, root_cert: Path, name: str = CONNECTION_NAME, default: bool = True
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with a ``[superlink.<name>]`` connection to a TLS SuperLink's Control
    API (``address`` = host:port, ``root-certificates`` = the CA, absolute). Other connections already in
    the file are kept. Returns ``flwr_home``."""
    flwr_home = Path(flwr_home).resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    existing: dict = {}
    if path.is_file():
        try:
            existing = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise DeployError(f"{path}: not valid TOML ({err}); fix or remove it") from err
    connections = {k: v for k, v in existing.get("superlink", {}).items() if isinstance(v, dict)}
    connections[name] = {"address": address, "root-certificates": str(Path(root_cert).resolve())}
    default_name = name if default else existing.get("superlink", {}).get("default", name)
    lines = ["[superlink]", f"default = {_toml_string(default_name)}", ""]
    for conn_name, table in connections.items():
        lines.append(f"[superlink.{_toml_string(conn_name)}]")
        for key, value in table.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                lines.append(f"{key} = {value!r}")
            elif isinstance(value, str):
                lines.append(f"{key} = {_toml_string(value)}")
            # nested option tables (simulation options) are not needed by a deployment connection
        lines.append("")
    path.write_text("\n".join(lines))
    return flwr_home


def register_supernodes(
    public_keys: Iterable[Path],
    *,
    flwr_home: Path,
    connection: str = CONNECTION_NAME,
    exist_ok: bool = False,
    timeout: float = 60.0,
) -> list[int | None]:
    """``flwr supernode register KEY CONNECTION`` for each public key; returns the node ids the SuperLink gave
    (None for a key that was already registered, with ``exist_ok``).

    Raises:
        DeployError: a key file is missing, or the SuperLink refused a key (the message carries its reason).
    """
    flwr = _flower_executable("flwr")
    node_ids: list[int | None] = []
    for key in public_keys:
        key = Path(key).resolve()
        if not key.is_file():
            raise DeployError(f"{key}: no such public key file")
        result = subprocess.run(
            [flwr, "supernode", "register", str(key), connection, "--format", "json"],
            capture_output=True,
            text=True,
            env=flower_env(flwr_home),
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        # With --format json the CLI exits 0 even on failure and reports {"success": false, "error-message"}.
        try:
            reply = json.loads(result.stdout)
        except json.JSONDecodeError:
            reply = {"success": False, "error-message": (result.stdout + result.stderr).strip()}
        if reply.get("success") and "node-id" in reply:
            node_ids.append(int(reply["node-id"]))
        elif exist_ok and "already in use" in str(reply.get("error-message", "")):
            node_ids.append(None)
        else:
            raise DeployError(
                f"`flwr supernode register {key} {connection}` failed (exit {result.returncode}): "
                f"{reply.get('error-message') or result.stderr.strip()}"
            )
    return node_ids


# -- command line: `chorus server ...` -----------------------------------------------

server_cli = typer.Typer(help="Run the federation's server: development certificates, a TLS SuperLink.", no_args_is_help=True)


@server_cli.command("certs")
def certs_cmd(
    out: Annotated[Path, typer.Option(help="Directory for ca.crt, server.pem/.key and the node keys.")],
    nodes: Annotated[int, typer.Option(min=0, help="SuperNode key pairs to create (supernode-<i>.key/.pub).")] = 2,
    host: Annotated[
        Optional[list[str]], typer.Option("--host", help="SAN of the server certificate (DNS name or IP); repeatable.")
    ] = None,
) -> None:
    """Create a development CA, a SuperLink server certificate and SuperNode authentication keys."""
    certs = make_dev_certificates(out, tuple(host) if host else ("localhost", "127.0.0.1"))
    pairs = make_node_keys(out, nodes)
    typer.echo(f"CA certificate:     {certs.ca_cert}  (give it to every device: --root-cert)")
    typer.echo(f"server certificate: {certs.server_cert}  key {certs.server_key}")
    for pair in pairs:
        typer.echo(f"SuperNode key pair: {pair.private_key}  {pair.public_key}")


@server_cli.command("start")
def start_cmd(
    certs: Annotated[Path, typer.Option(help="Directory written by `chorus server certs`.")],
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="HTTPS port of the SuperLink (all its APIs; Flower's default).")
    ] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    state_dir: Annotated[Path, typer.Option(help="SuperLink database, log, and the FLWR_HOME for `flwr`.")] = Path(
        "superlink-state"
    ),
    register: Annotated[
        Optional[list[Path]],
        typer.Option("--register", help="A SuperNode public key to admit (default: every *.pub in --certs); repeatable."),
    ] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Admit any SuperNode (TLS only).")] = False,
) -> None:
    """Start a TLS SuperLink with SuperNode authentication, register the devices' keys, and keep it running."""
    state_dir = state_dir.resolve()
    log_file = state_dir / "superlink.log"
    try:
        proc = start_superlink(certs=certs, port=port, state_dir=state_dir, host=host, supernode_auth=not no_auth)
    except DeployError as err:
        fail(str(err))
    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops the Flower processes too, as Ctrl-C does
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # reach it through an address in the SAN
    try:
        wait_until_listening(proc, local, port, log_file=log_file)
        flwr_home = write_flower_config(state_dir / "flwr", address=f"{local}:{port}", root_cert=_certificates_in(certs).ca_cert)
        if not no_auth:
            keys = register or sorted(certs.glob("*.pub"))
            if not keys:
                typer.echo(f"warning: no public keys to register in {certs}: no SuperNode can join", err=True)
            for key, node_id in zip(keys, register_supernodes(keys, flwr_home=flwr_home, exist_ok=True)):
                typer.echo(f"registered {key} as node {node_id}" if node_id is not None else f"{key} was already registered")
        typer.echo(
            f"SuperLink on https://{host}:{port} (log {log_file}). Run the app with:\n"
            f"  FLWR_HOME={flwr_home} flwr run . {CONNECTION_NAME} --run-config 'workdir=\"...\"' --stream\n"
            "Ctrl-C stops it."
        )
        code = proc.wait()
    except DeployError as err:
        typer.echo(f"error: {err}", err=True)  # printed now; the exit waits for the SuperLink to stop
        code = 1
    except KeyboardInterrupt:
        code = 0
    finally:
        stop_process(proc)
    if code:
        raise typer.Exit(code=1)
