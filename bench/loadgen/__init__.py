"""Load generators: wrk for plain request/response, small asyncio clients (run as their own
process, pinned to the load generator's CPU) for streams, transfers and WebSockets."""
