"""A gRPC test server and a proxyless gRPC client for tests/tests/xds.rs.

The client is grpcio's own xDS resolver (nothing of ours): GRPC_XDS_BOOTSTRAP names the
agent's xDS address, and `xds:///SERVICE` is resolved through LDS, RDS, CDS and EDS.

    xds_grpc.py serve ADDR [ADDR...]   serve on each ADDR (ip:port); print "serving ADDR"
                                       per address; stop when stdin closes
    xds_grpc.py call TARGET SECONDS    call TARGET every 20 ms for SECONDS; print one JSON
                                       line per call: {"ok": "ip:port"} or {"error": "..."}

The service is generic (no generated code): /tidings.test.Echo/Who answers the address the
server listens on, as bytes.
"""

import json
import sys
import time
from concurrent import futures

import grpc

METHOD = "/tidings.test.Echo/Who"


def serve(addrs):
    servers = []
    for addr in addrs:
        reply = addr.encode()

        def who(request, context, reply=reply):
            return reply

        handler = grpc.method_handlers_generic_handler(
            "tidings.test.Echo",
            {"Who": grpc.unary_unary_rpc_method_handler(who)},
        )
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((handler,))
        if server.add_insecure_port(addr) == 0:
            print(f"cannot listen on {addr}", flush=True)
            return 1
        server.start()
        servers.append(server)
        print(f"serving {addr}", flush=True)
    # Until the test closes stdin (or kills us).
    sys.stdin.read()
    for s in servers:
        s.stop(0)
    return 0


def call(target, seconds):
    end = time.monotonic() + seconds
    with grpc.insecure_channel(target) as channel:
        who = channel.unary_unary(METHOD)
        while time.monotonic() < end:
            try:
                got = who(b"", timeout=2)
                print(json.dumps({"ok": got.decode()}), flush=True)
            except grpc.RpcError as e:
                print(json.dumps({"error": f"{e.code()}: {e.details()}"}), flush=True)
            time.sleep(0.02)
    return 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "serve":
        return serve(argv[1:])
    if len(argv) == 3 and argv[0] == "call":
        return call(argv[1], float(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
