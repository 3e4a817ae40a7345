"""`tracechain points` from a shell: rules, participants, a JSON Lines file ingested (twice),
balance, history, a claim, the sweep; bad input exits 2 and writes nothing, refusals exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from contracts.deployment import Deployment
from ledger import db

BIN = Path(sys.executable).parent
DEPLOYMENT = Deployment(
    chain_id=31337,
    start_block=0,
    token="0x" + "10" * 20,
    escrow="0x" + "20" * 20,
    vault="0x" + "30" * 20,
    treasury="0x" + "40" * 20,
    fee_wallet="0x" + "50" * 20,
)
WALLET = "0x" + "a1" * 20


def _run(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")} | env
    return subprocess.run(
        [str(BIN / "tracechain"), *args], env=full, input=stdin, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def _counts(url: str) -> tuple[int, ...]:
    engine = db.make_engine(url, role=None, pool_size=1)
    try:
        with engine.connect() as conn:
            return tuple(
                conn.execute(
                    sa.text(
                        "SELECT (SELECT count(*) FROM points_events), (SELECT count(*) FROM points_rules),"
                        " (SELECT count(*) FROM points_participants), (SELECT count(*) FROM points_claims),"
                        " (SELECT count(*) FROM ledger_entries)"
                    )
                ).one()
            )
    finally:
        engine.dispose()


def test_points_from_the_shell(fresh_db_url: str, tmp_path: Path) -> None:
    DEPLOYMENT.save(tmp_path / "deployment.json")
    env = {
        "TRACE_DATABASE_URL": fresh_db_url,
        "TRACE_DEPLOYMENT_FILE": str(tmp_path / "deployment.json"),
        "TRACE_DATA_DIR": str(tmp_path),
        "TRACE_POINTS_PER_TRACE": "4",
        "TRACE_LOG_LEVEL": "WARNING",
    }
    rule = _run(["points", "rules", "set", "scan", "--points", "5", "--tier-multiplier", "gold=20000"], env)
    assert rule.returncode == 0, rule.stderr
    since = json.loads(rule.stdout)["effective_at"]
    for participant, extra in (("acme", ["--wallet", WALLET]), ("zeta", [])):
        made = _run(["points", "participant", "set", participant, "--tier", "gold", *extra], env)
        assert made.returncode == 0 and json.loads(made.stdout)["result"] == "created", made.stderr
    lines = [
        json.dumps({"source": "dock", "event_id": f"e{i}", "participant": "acme" if i % 2 else "zeta",
                    "type": "scan", "occurred_at": since})
        for i in range(10)
    ]  # fmt: skip
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(lines) + "\n")
    first = _run(["points", "ingest", str(events)], env)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert (report["batches"], report["received"], report["created"], report["points"]) == (1, 10, 10, "100")
    assert (report["exists"], report["conflicts"], report["rejected"], report["skipped"]) == (0, 0, 0, [])
    again = _run(["points", "ingest", "-"], env, stdin="\n".join(lines))
    assert again.returncode == 0 and json.loads(again.stdout)["exists"] == 10, again.stderr
    balance = json.loads(_run(["points", "balance", "acme"], env).stdout)
    assert (balance["posted"], balance["claimable"]) == ("50", "50")
    history = [
        json.loads(line)
        for line in _run(["points", "history", "acme", "--limit", "2"], env).stdout.splitlines()
    ]
    assert len(history) == 2 and history[0]["reason"] == "scan v1: 5 points x 200% (gold) = 10"

    claim = _run(["points", "claim", "acme", "--points", "10", "--key", "c1"], env)
    assert claim.returncode == 0, claim.stderr
    assert (json.loads(claim.stdout)["trace_amount"], json.loads(claim.stdout)["status"]) == (
        str(25 * 10**17),
        "pending",
    )

    before = _counts(fresh_db_url)
    # Refused: exit 1, nothing written.
    for args in (
        ["points", "claim", "acme", "--points", "41", "--key", "c2"],  # 40 left
        ["points", "claim", "zeta", "--points", "1", "--key", "c3"],  # no wallet
        ["points", "claim", "acme", "--points", "11", "--key", "c1"],  # the key of another claim
    ):
        refused = _run(args, env)
        assert refused.returncode == 1, (args, refused.stdout, refused.stderr)
    # Bad usage or malformed input: exit 2, nothing written.
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text(lines[0] + "\n{not json\n")
    for args in (
        ["points", "ingest", str(bad_file)],
        ["points", "claim", "acme", "--points", "-5", "--key", "c4"],
        ["points", "rules", "set", "scan", "--points", "1", "--effective-at", "2020-01-01T00:00:00Z"],
        ["points", "rules", "set", "scan", "--points", "1.5"],
        ["points", "participant", "set", "bad id", "--tier", "gold"],
        ["points", "participant", "set", "acme", "--tier", "gold", "--wallet", "0x12"],
    ):
        refused = _run(args, env)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
    assert _counts(fresh_db_url) == before

    conflicting = json.dumps({**json.loads(lines[0]), "participant": "acme"})
    partly = _run(["points", "ingest", "-"], env, stdin=conflicting)
    assert partly.returncode == 1 and json.loads(partly.stdout)["conflicts"] == 1
    swept = _run(["points", "expire"], env)
    assert swept.returncode == 0 and json.loads(swept.stdout) == {"lots": 0, "points": "0", "examined": 0}
