"""The SIGHUP plan: which differences apply live, restart the core, or need a new process."""

from npgevent.cores.reload import keep_process_only, plan
from npgevent.settings import resolve
from npgevent.url import parse_url


def opts(url: str, **base: str):
    spec = parse_url(url)
    return spec, resolve(spec.scheme, spec.query_map, base)[0]


SERVER = "server://key@127.0.0.1:10101/127.0.0.1:8080,127.0.0.1:8081?mode=1"


def test_nothing_changed_is_empty():
    s, o = opts(SERVER)
    assert plan(s, o, s, o, listens_on_target=True).empty


def test_live_settings():
    s, o = opts(SERVER)
    s2, o2 = opts(SERVER + "&log=debug&rate=10&slot=5&read=30s&dns=9.9.9.9&proxy=1",
                  service_cooldown="1s")
    p = plan(s, o, s2, o2, listens_on_target=True)
    assert sorted(p.live) == ["dns", "log", "proxy", "rate", "read", "service_cooldown", "slot"]
    assert not p.restart and not p.process


def test_targets_live_except_the_one_a_core_listens_on():
    s, o = opts(SERVER)
    s2, o2 = opts(SERVER.replace("127.0.0.1:8081", "127.0.0.1:9999"))
    assert plan(s, o, s2, o2, listens_on_target=True).live == ["targets"]
    s3, o3 = opts(SERVER.replace("127.0.0.1:8080", "127.0.0.1:9999"))
    assert plan(s, o, s3, o3, listens_on_target=True).restart == ["listening target"]
    assert plan(s, o, s3, o3, listens_on_target=False).live == ["targets"]


def test_structural_and_process_only():
    s, o = opts(SERVER)
    s2, o2 = opts(SERVER.replace("key@", "other@").replace("10101", "10102") + "&tls=1&max=8&auth=2",
                  handshake_timeout="9s", log_format="json", workers="2")
    p = plan(s, o, s2, o2, listens_on_target=True)
    assert p.restart == ["tunnel address or key", "tls", "max", "auth", "handshake_timeout"]
    assert sorted(p.process) == ["log_format", "workers"]
    kept = keep_process_only(o, o2)
    assert (kept.log_format, kept.workers, kept.tls) == ("text", 1, "1")


def test_the_scheme_cannot_change():
    s, o = opts(SERVER)
    s2, o2 = opts("client://key@127.0.0.1:10101/127.0.0.1:8080")
    p = plan(s, o, s2, o2, listens_on_target=True)
    assert p.process == ["scheme"] and not p.live and not p.restart
