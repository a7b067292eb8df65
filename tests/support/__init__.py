"""What the test suites share (one of each): ports, waiting, owners, Redis, telemetry.

- `ports`: `free_port`, `free_ports`
- `waiting`: `wait_until`, the one poller for things outside the test's control
- `owners`: identities of local processes (`dead_pid`, `identity_of`, `dead_owner`)
- `redis`: a real `redis-server` on loopback (`running_redis`)
- `telemetry`: `Telemetry`, the package's own `BgTasks` harness with the unit tests' readers

The fixtures built on them (`telemetry`, `instrument`, `store`, `redis_server`) are in
`tests/conftest.py`.
"""
