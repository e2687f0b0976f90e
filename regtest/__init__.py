"""Local bitcoind regtest tooling: operator scripts (start.sh, fund.sh, stop.sh) and the test harness."""
