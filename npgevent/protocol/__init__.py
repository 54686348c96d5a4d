"""Sans-IO codecs of the NodePass protocol: bytes in, values out; no sockets, no gevent."""
