"""The settings table and option resolution."""

import pytest

from npgevent.errors import ConfigError
from npgevent.settings import BY_QUERY, SETTINGS, TUNABLES, Options, resolve

GO_QUERY_KEYS = "log tls crt key dns min max mode quic dial read rate slot proxy notcp noudp".split()
GO_ENV = {
    "NP_SEMAPHORE_LIMIT": "65536", "NP_TCP_DATA_BUF_SIZE": "16384", "NP_UDP_DATA_BUF_SIZE": "16384",
    "NP_DNS_CACHING_TTL": "5m0s", "NP_HANDSHAKE_TIMEOUT": "5s", "NP_TCP_DIAL_TIMEOUT": "5s",
    "NP_UDP_DIAL_TIMEOUT": "5s", "NP_UDP_READ_TIMEOUT": "30s", "NP_POOL_GET_TIMEOUT": "5s",
    "NP_MIN_POOL_INTERVAL": "100ms", "NP_MAX_POOL_INTERVAL": "1s", "NP_REPORT_INTERVAL": "5s",
    "NP_SERVICE_COOLDOWN": "3s", "NP_SHUTDOWN_TIMEOUT": "5s", "NP_RELOAD_INTERVAL": "1h0m0s",
}


def test_every_go_query_parameter_is_in_the_table():
    ours = [name for name, s in BY_QUERY.items() if not s.go]  # npgevent's own (auth=, metrics=, workers=)
    assert sorted(name for name in BY_QUERY if name not in ours) == sorted(GO_QUERY_KEYS)
    assert ours == ["auth", "metrics", "workers"]


def test_every_go_env_variable_with_go_default():
    table = {s.env: s.fmt(s.default) for s in TUNABLES}
    for env, default in GO_ENV.items():
        assert table[env] == default, env


def test_query_defaults_match_go():
    o = Options()
    assert (o.log, o.tls, o.crt, o.key) == ("info", "0", "", "")
    assert o.dns == ("1.1.1.1", "8.8.8.8")
    assert (o.min, o.max, o.mode, o.quic, o.dial) == (64, 1024, "0", False, "auto")
    assert (o.read, o.rate, o.slot, o.proxy, o.notcp, o.noudp) == (0.0, 0, 65536, False, False, False)


def test_each_setting_has_flag_env_config_key_and_help():
    names = set()
    for s in SETTINGS:
        assert s.flag.startswith("--") and s.env.startswith("NP_") and s.help
        assert s.config_key == s.flag[2:]
        names.add(s.env)
    assert len(names) == len(SETTINGS)


def test_url_query_parsed_and_typed():
    o, warnings = resolve("client", {"min": "8", "read": "1m30s", "rate": "100", "dns": "9.9.9.9, [2620:fe::fe]:53",
                                     "proxy": "1", "notcp": "0", "dial": "::1", "mode": "2"})
    assert warnings == []
    assert o.min == 8 and o.read == 90.0 and o.rate == 100 and o.proxy and not o.notcp
    assert o.dns == ("9.9.9.9", "[2620:fe::fe]:53")
    assert o.dial == "::1" and o.mode == "2"


@pytest.mark.parametrize(("query", "message"), [
    ({"min": "abc"}, "URL parameter min= 'abc': expected an integer"),
    ({"max": "1e3"}, "expected an integer"),
    ({"read": "5x"}, "read= '5x': expected a Go duration"),
    ({"mode": "7"}, "mode= '7': expected one of 0, 1, 2"),
    ({"tls": "9"}, "tls= '9': expected one of 0, 1, 2"),
    ({"quic": "yes"}, "quic= 'yes': expected 0 or 1"),
    ({"log": "verbose"}, "expected one of none, debug, info, warn, error, event"),
    ({"dial": "host.example"}, "expected 'auto' or a local IP address"),
    ({"dns": "8.8.8.8:99999"}, "bad port"),
])
def test_unparseable_is_config_error(query, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve("server", query)


@pytest.mark.parametrize(("key", "raw", "attr", "default"), [
    ("min", "0", "min", 64), ("min", "-3", "min", 64), ("max", "0", "max", 1024), ("slot", "-1", "slot", 65536),
    ("rate", "-1", "rate", 0), ("read", "-1s", "read", 0.0),
])
def test_out_of_range_keeps_go_default_with_warning(key, raw, attr, default):
    role = "server" if key == "max" else "client"
    o, warnings = resolve(role, {key: raw})
    assert getattr(o, attr) == default
    assert len(warnings) == 1 and ("%s= %r is out of range" % (key, raw)) in warnings[0]


def test_base_values_and_url_override():
    o, _ = resolve("client", {"slot": "9"}, {"slot": "5", "rate": "3", "report_interval": "250ms"})
    assert o.slot == 9 and o.rate == 3 and o.report_interval == 0.25


def test_bad_base_value_names_flag_and_env():
    with pytest.raises(ConfigError, match=r"--pool-get-timeout/NP_POOL_GET_TIMEOUT 'soon'"):
        resolve("client", {}, {"pool_get_timeout": "soon"})


def test_nonpositive_tunable_falls_back_with_warning():
    o, warnings = resolve("client", {}, {"report_interval": "0s", "tcp_data_buf_size": "-5"})
    assert o.report_interval == 5.0 and o.tcp_data_buf_size == 16384
    assert len(warnings) == 2


def test_unknown_and_misplaced_parameters_warn():
    _, warnings = resolve("client", {"bogus": "1", "max": "10"})
    assert "unknown URL parameter 'bogus' ignored" in warnings
    assert "URL parameter max= has no effect on a client" in warnings


def test_empty_value_keeps_default():
    o, warnings = resolve("client", {"min": "", "read": ""})
    assert o.min == 64 and o.read == 0.0 and warnings == []


def test_workers_auto_is_the_cpus_the_process_may_run_on(monkeypatch):
    """workers=auto counts the affinity mask (taskset, CPUAffinity=, a cpuset), not every CPU
    of the machine: three of a 64-CPU machine's CPUs make three workers."""
    import os

    from npgevent import cpus

    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda proc=cpus.PROC: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 5, 9})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    for raw in ("auto", "AUTO", " auto "):
        o, warnings = resolve("client", {"workers": raw})
        assert o.workers == 3 and warnings == []
    o, _ = resolve("client", {"workers": "4"})
    assert o.workers == 4
    with pytest.raises(ConfigError, match=r"workers= 'many': expected a number of processes or 'auto'"):
        resolve("client", {"workers": "many"})


def test_workers_auto_without_an_affinity_call_counts_every_cpu(monkeypatch):
    import os

    from npgevent import cpus

    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda proc=cpus.PROC: None)
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert resolve("client", {"workers": "auto"})[0].workers == 6
