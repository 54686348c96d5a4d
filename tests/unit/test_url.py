"""NodePass URL parsing."""

import json

import pytest
from helpers import DATA

from npgevent.errors import ConfigError
from npgevent.url import HostPort, fnv1a32_hex, parse_url


def test_default_key_is_fnv1a_of_port_string():
    assert fnv1a32_hex("10101") == "e68be2b4"
    spec = parse_url("client://127.0.0.1:10101/127.0.0.1:80")
    assert spec.key == "e68be2b4" and not spec.key_given


def test_default_keys_match_go_captures():
    for name in ("fwd_tls0_defaultkey.json",):
        capture = json.loads((DATA / "vectors" / name).read_text())
        spec = parse_url(capture["server_url"])
        assert spec.key == capture["key"]
        assert parse_url(capture["client_url"]).key == capture["key"]


def test_key_and_addresses():
    spec = parse_url("server://secret@127.0.0.2:45441/127.0.0.1:38963?mode=1&tls=0&max=4&log=debug")
    assert (spec.scheme, spec.key, spec.key_given) == ("server", "secret", True)
    assert spec.tunnel == HostPort("127.0.0.2", 45441)
    assert spec.targets == (HostPort("127.0.0.1", 38963),)
    assert spec.query_map == {"mode": "1", "tls": "0", "max": "4", "log": "debug"}
    assert spec.base_url() == "server://secret@127.0.0.2:45441/127.0.0.1:38963"


def test_empty_tunnel_host_ipv6_and_target_groups():
    spec = parse_url("server://:10101/ 10.0.0.1:80 ,, [2001:db8::1]:443,backend.example:8080 ")
    assert spec.tunnel == HostPort("", 10101) and spec.tunnel.is_unspecified
    assert [str(t) for t in spec.targets] == ["10.0.0.1:80", "[2001:db8::1]:443", "backend.example:8080"]
    assert spec.base_url() == "server://e68be2b4@:10101/10.0.0.1:80,[2001:db8::1]:443,backend.example:8080"
    v6 = parse_url("client://[::1]:9000/[::1]:9001")
    assert str(v6.tunnel) == "[::1]:9000"


def test_percent_encoded_key_and_first_query_value_wins():
    spec = parse_url("client://p%40ss@host.example:1000/a.example:1?min=1&min=2")
    assert spec.key == "p@ss"
    assert spec.query_map["min"] == "1"


def test_master_url():
    spec = parse_url("master://0.0.0.0:9090/admin/?log=info&tls=1")
    assert (spec.scheme, spec.prefix, str(spec.tunnel)) == ("master", "/admin", "0.0.0.0:9090")
    assert parse_url("master://127.0.0.1:9090").prefix == "/api"
    assert parse_url("master://127.0.0.1:9090/").prefix == "/api"


@pytest.mark.parametrize(("url", "message"), [
    ("http://x:1/y:2", "invalid URL scheme 'http'"),
    ("client:/127.0.0.1:1/x:2", "expected server://, client:// or master://"),
    ("client://127.0.0.1/x:1", "expected host:port"),
    ("client://127.0.0.1:80", "missing target address"),
    ("client://127.0.0.1:80/,,", "missing target address"),
    ("client://127.0.0.1:0/x:1", "port '0'"),
    ("client://127.0.0.1:65536/x:1", "port '65536'"),
    ("client://127.0.0.1:80/x:http", "port 'http'"),
    ("client://::1:80/x:1", "put an IPv6 address in brackets"),
    ("client://[1.2.3.4]:80/x:1", "IPv4 address cannot be in brackets"),
    ("client://bad_host!:80/x:1", "not a valid host name"),
    ("client://127.0.0.1:80/127.0.0.1:80", "tunnel port 80 conflicts with target address 127.0.0.1:80"),
    ("client://127.0.0.1:80/localhost:80", "conflicts with target address localhost:80"),
    ("server://:80/192.0.2.7:80", "conflicts with target address 192.0.2.7:80"),
    ("server://[::]:80/[::1]:80", "conflicts"),
])
def test_errors(url, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_url(url)


def test_loop_guard_allows_remote_target_on_same_port_with_specific_host():
    spec = parse_url("server://192.0.2.1:80/192.0.2.7:80")
    assert spec.targets[0].port == 80
