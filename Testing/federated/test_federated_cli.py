"""`segviz federation ...` argument parsing and TLS material (no processes started)."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from SegVizLogic.cli import build_parser
from SegVizLogic.errors import SegVizInputError
from SegVizLogic.federated.certs import write_certificates, write_node_key_pair
from SegVizLogic.federated.processes import parse_host_port

TEST_ADDRESSES = [
    ["127.0.0.1:9093", ("127.0.0.1", 9093)],
    ["coordinator.example.org", ("coordinator.example.org", 9093)],
    ["[::1]:8080", ("::1", 8080)],
]


@pytest.mark.parametrize("text, expected", TEST_ADDRESSES)
def test_parse_host_port(text, expected):
    assert parse_host_port(text) == expected


def test_parse_host_port_rejects_garbage():
    with pytest.raises(SegVizInputError, match="HOST:PORT"):
        parse_host_port("host:notaport")


def test_federation_commands_parse():
    parser = build_parser()
    args = parser.parse_args(
        [
            "federation",
            "simulate",
            "--site",
            "a",
            "--site",
            "b",
            "--out",
            "o",
            "--rounds",
            "2",
            "--strategy",
            "fedavg",
            "--progress",
            "json",
        ]
    )
    assert [str(s) for s in args.site] == ["a", "b"] and args.strategy == "fedavg" and args.share_final_batchnorm
    args = parser.parse_args(["federation", "join", "--superlink", "h:1", "--site", "s", "--insecure"])
    assert args.insecure and args.root_cert is None and args.connect_timeout == 30
    assert args.trust is None and not args.share_final_batchnorm  # a site shares its BatchNorm only if it agrees
    args = parser.parse_args(
        ["federation", "join", "--superlink", "h:1", "--site", "s", "--root-cert", "ca.crt", "--trust", "t.yaml"]
        + ["--auth-key", "node.key", "--share-final-batchnorm"]
    )
    assert args.share_final_batchnorm and str(args.trust) == "t.yaml" and str(args.auth_key) == "node.key"
    with pytest.raises(SystemExit):  # TLS and --insecure are exclusive
        parser.parse_args(
            ["federation", "join", "--superlink", "h:1", "--site", "s", "--insecure", "--root-cert", "ca.crt"]
        )
    args = parser.parse_args(["federation", "run", "--out", "o", "--no-share-final-batchnorm"])
    # run and register talk to the loopback Control API, one port above the sites' Fleet port.
    assert not args.share_final_batchnorm and args.superlink == "127.0.0.1:9094" and args.signing_key is None
    args = parser.parse_args(["federation", "superlink", "--tls-dir", "tls"])
    assert not args.open_enrolment and args.control_address is None and args.address == "0.0.0.0:9093"
    assert parser.parse_args(["federation", "register", "--public-key", "p", "--root-cert", "c"]).superlink == (
        "127.0.0.1:9094"
    )


def test_certificates_name_localhost_and_extra_hosts(tmp_path):
    paths = write_certificates(tmp_path, hosts=["10.0.0.5", "fl.hospital.org"])
    cert = x509.load_pem_x509_certificate(paths["server.crt"].read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "fl.hospital.org"} <= set(names.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.0.0.5"} <= {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert (paths["server.key"].stat().st_mode & 0o777) == 0o600
    with pytest.raises(SegVizInputError, match="already exists"):
        write_certificates(tmp_path)


def test_node_key_pair_is_what_flower_reads(tmp_path):
    private, public = write_node_key_pair(tmp_path)
    key = load_ssh_private_key(private.read_bytes(), None)
    assert key.public_key().public_numbers() == load_ssh_public_key(public.read_bytes()).public_numbers()


def test_long_running_commands_can_be_interrupted_even_if_started_with_sigint_ignored():
    """A shell without job control starts background commands with SIGINT ignored; ``join``,
    ``run`` and ``superlink`` still turn SIGINT (and SIGTERM) into KeyboardInterrupt, and give the
    inherited disposition back afterwards."""
    import os
    import signal
    import time

    from SegVizLogic.federated.cli import _terminate_as_interrupt

    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with pytest.raises(KeyboardInterrupt), _terminate_as_interrupt():
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the signal interrupts this at once
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)
