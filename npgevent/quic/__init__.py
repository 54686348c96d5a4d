"""QUIC pool transport: aioquic in a dedicated native thread, bridged to gevent.

``bridge`` (the hand-off), ``thread`` (everything that runs in the QUIC thread)
and ``stream`` (the engine facade and socket-like streams greenlets use).
"""
