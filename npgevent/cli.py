"""The ``npgevent`` command line: one NodePass URL, options from everywhere.

The parser is generated from the settings table (:mod:`npgevent.settings`):
each option can come from a CLI flag, an ``NP_*`` environment variable or a
config file (``-c FILE``, or the first of :data:`DEFAULT_CONFIG_FILES` that
exists), with precedence CLI > env > config file > default; the URL's query
parameters then override all of them for that instance.

Errors in what the user gave (URL, option values, files) are printed as one
line, ``npgevent: error: ...``, with exit status 2.  Once running, SIGTERM and
SIGINT put a token on a queue (signal handlers do nothing else); the main
greenlet then stops the instance within ``NP_SHUTDOWN_TIMEOUT`` and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import configargparse

from . import NODEPASS_VERSION, __version__
from . import log as logmod
from .errors import ConfigError, CoreError
from .settings import SETTINGS, resolve, tunable_summary
from .url import TunnelSpec, parse_url

DEFAULT_CONFIG_FILES = ("/etc/npgevent.conf", "~/.config/npgevent.conf")
EXIT_USAGE = 2
WORKER_ENV = "NPG_WORKER"  # set by a parent npgevent for its workers (npgevent.workers)


class _Parser(configargparse.ArgumentParser):
    """configargparse with one-line errors (no usage dump) and exit status 2."""

    raise_errors = False  # True while reloading: a bad value must not end the daemon

    def error(self, message: str) -> NoReturn:
        if self.raise_errors:
            raise ConfigError(" ".join(message.split()))
        sys.stderr.write("npgevent: error: %s\n" % " ".join(message.split()))
        sys.exit(EXIT_USAGE)


def build_parser() -> configargparse.ArgumentParser:
    parser = _Parser(
        prog="npgevent",
        description="NodePass v1.11.0-compatible TCP/UDP tunnel and port forwarder (gevent).",
        epilog=(
            "URL forms: server://[key@]host:port/target[,target...]?query, "
            "client://[key@]host:port/target[,...]?query, master://host:port/prefix?query. "
            "URL query parameters override every other source for that instance."
        ),
        default_config_files=list(DEFAULT_CONFIG_FILES),
        args_for_setting_config_path=["-c", "--config"],
        config_arg_help_message="config file path (key = value lines; keys are the long option names)",
        formatter_class=configargparse.HelpFormatter,  # defaults are in each help text, once
    )
    parser.add_argument("url_arg", nargs="?", metavar="URL",
                        help="the NodePass URL (server://, client:// or master://)")
    parser.add_argument("--url", env_var="NP_URL", default=None,
                        help="the NodePass URL, when not given as the positional argument")
    parser.add_argument("--version", action="version",
                        version="npgevent %s (NodePass %s compatible)" % (__version__, NODEPASS_VERSION))
    for s in SETTINGS:
        extra = " (URL: %s=)" % s.query if s.query else ""
        parser.add_argument(s.flag, env_var=s.env, default=None, metavar="VALUE",
                            help="%s; default %s%s" % (s.help, s.fmt(s.default) or "''", extra))
    return parser


def parse(argv: Sequence[str] | None = None, reloading: bool = False) -> tuple[TunnelSpec, Any, list[str]]:
    """Parse argv/env/config into (spec, options, warnings); raise ConfigError on bad input."""
    parser = build_parser()
    parser.raise_errors = reloading
    # an empty variable counts as unset, as Go's os.Getenv checks do
    env = {k: v for k, v in os.environ.items() if v.strip() != ""}
    ns = parser.parse_args(argv, env_vars=env)
    raw = ns.url_arg or ns.url
    if not raw:
        raise ConfigError("missing NodePass URL: give it as the argument, --url, NP_URL or 'url =' "
                          "in the config file (see npgevent --help)")
    spec = parse_url(raw)
    base = {s.name: getattr(ns, s.name) for s in SETTINGS}
    options, warnings = resolve(spec.scheme, spec.query_map, base)
    return spec, options, warnings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        worker = None
        if WORKER_ENV in os.environ:  # a worker of a parent npgevent (workers= > 1)
            from .workers import WorkerRole

            worker = WorkerRole.from_env()
        spec, options, warnings = parse(argv)
    except ConfigError as exc:
        sys.stderr.write("npgevent: error: %s\n" % exc)
        return EXIT_USAGE
    logmod.setup(fmt=options.log_format, instance="%s://%s" % (spec.scheme, spec.tunnel))
    ilog = logmod.InstanceLog(options.log)
    raise_fd_limit(ilog)
    ilog.debug("Init log level: %s", options.log.upper())
    for warning in warnings:
        ilog.warn(warning)
    ilog.debug("Tunables: %s", tunable_summary(options))
    from .cores import build_runner

    try:
        if options.workers > 1 and worker is None:
            from .workers import Supervisor, check_single_end

            check_single_end(spec, options, None)
            supervisor = Supervisor(spec, options, ilog, sys.argv[1:] if argv is None else argv)
            return serve(supervisor, supervisor.reload)
        runner = build_runner(spec, options, ilog)
    except ConfigError as exc:
        sys.stderr.write("npgevent: error: %s\n" % exc)
        return EXIT_USAGE
    if worker is not None:
        worker.adapt(runner)
    return serve(runner, lambda: reload(runner, argv))


def reload(runner: Any, argv: Sequence[str] | None) -> None:
    """SIGHUP: read the config file, the environment given at start and the CLI again, and
    hand the result to the runner; a value that fails validation changes nothing."""
    runner.log.info("Reload: SIGHUP received: reading the settings again")
    try:
        spec, options, warnings = parse(argv, reloading=True)
    except ConfigError as exc:
        runner.log.error("Reload failed: %s: keeping the current settings", exc)
        return
    for warning in warnings:
        runner.log.warn(warning)
    runner.reload(spec, options)


def raise_fd_limit(log: logmod.InstanceLog, want: int = 1 << 20) -> None:
    """Lift the soft open-files limit towards the hard one: every session and idle
    pool connection is a file descriptor, and 1024 is a common soft default."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(hard, want)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("Open files limit raised: %d -> %d", soft, target)
    except (ImportError, OSError, ValueError) as exc:
        log.debug("Open files limit unchanged: %s", exc)


def serve(runner: Any, on_reload: Any = None) -> int:
    """Run *runner* until SIGTERM/SIGINT, then stop it gracefully; return the exit status.
    SIGHUP calls *on_reload* (in a greenlet of its own), or is ignored without one."""
    import gevent
    from gevent.queue import Empty, Queue

    from .heap import HeapTrimmer

    tokens: Queue = Queue()
    handlers = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        # gevent runs these callbacks in the hub, outside the real signal handler;
        # they only enqueue, the main greenlet does the work.
        handlers.append(gevent.signal_handler(signum, tokens.put_nowait, signum))
    reloads: Queue = Queue()
    handlers.append(gevent.signal_handler(signal.SIGHUP, reloads.put_nowait, signal.SIGHUP))

    def reloader() -> None:
        while True:
            reloads.get()
            if on_reload is None:
                continue
            try:
                on_reload()
            except Exception as exc:  # a bug must not take the daemon down with it
                runner.log.error("Reload failed: internal error: %r", exc, exc_info=True)

    reload_task = gevent.spawn(reloader)
    trimmer = HeapTrimmer()  # freed memory back to the OS now and then (npgevent.heap)
    trimmer.start()
    try:
        try:
            runner.start()
        except (CoreError, OSError) as exc:
            runner.log.error("%s", exc)
            sys.stdout.flush()
            return 1
        tokens.get()
        reload_task.kill(block=False)  # no reload while draining
        stopper = gevent.spawn(runner.stop)
        # a second signal while draining skips the grace period
        while not stopper.ready():
            try:
                tokens.get(timeout=0.2)
            except Empty:
                continue
            runner.log.info("Second signal: stopping now")
            stopper.kill(block=False)
            runner.stop(0)
            break
        stopper.join()
    finally:
        reload_task.kill(block=False)
        trimmer.close()
        for h in handlers:
            h.cancel()
    sys.stdout.flush()
    return 0

