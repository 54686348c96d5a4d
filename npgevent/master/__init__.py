"""Master mode: the REST API that creates, runs, stops and persists tunnel instances.

``records`` (instance records and the URL/counter rules), ``store`` (state file),
``instances`` (child processes), ``events`` (SSE), ``sysinfo`` (host metrics),
``openapi`` (route table, OpenAPI document, docs page), ``api`` (WSGI app) and
``core`` (the :class:`~npgevent.master.core.Master` itself).
"""
