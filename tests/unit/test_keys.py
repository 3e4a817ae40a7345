"""Signing keys from the environment or an encrypted keystore; errors never show key material."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account import Account

from ledger.settings import load_settings
from workers.keys import SigningKeyError, load_deployer, load_signer

KEY = "0x" + "11" * 32


def test_the_signer_comes_from_the_environment_and_the_deployer_defaults_to_it() -> None:
    settings = load_settings({"TRACE_SIGNER_KEY": KEY})
    assert load_signer(settings).address == Account.from_key(KEY).address
    assert load_deployer(settings).address == Account.from_key(KEY).address
    other = "0x" + "22" * 32
    assert load_deployer(load_settings({"TRACE_SIGNER_KEY": KEY, "TRACE_DEPLOYER_KEY": other})).address == (
        Account.from_key(other).address
    )


def test_the_key_never_shows_in_the_settings_repr() -> None:
    settings = load_settings({"TRACE_SIGNER_KEY": KEY, "TRACE_SIGNER_KEYSTORE_PASSWORD": "hunter2"})
    assert KEY not in repr(settings)
    assert "hunter2" not in repr(settings)


def test_a_keystore_file_is_decrypted_with_its_password(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    path.write_text(json.dumps(Account.encrypt(KEY, "right", kdf="pbkdf2", iterations=1000)))
    env = {"TRACE_SIGNER_KEYSTORE": str(path), "TRACE_SIGNER_KEYSTORE_PASSWORD": "right"}
    assert load_signer(load_settings(env)).address == Account.from_key(KEY).address
    with pytest.raises(SigningKeyError) as wrong:
        load_signer(load_settings({**env, "TRACE_SIGNER_KEYSTORE_PASSWORD": "wrong"}))
    assert "cannot be decrypted" in str(wrong.value)
    with pytest.raises(SigningKeyError, match="PASSWORD is not"):
        load_signer(load_settings({"TRACE_SIGNER_KEYSTORE": str(path)}))
    with pytest.raises(SigningKeyError, match="no keystore file"):
        load_signer(load_settings({**env, "TRACE_SIGNER_KEYSTORE": str(tmp_path / "missing.json")}))


@pytest.mark.parametrize("bad", ["0x1234", "not hex at all", "0x" + "zz" * 32])
def test_a_malformed_key_is_refused_without_echoing_it(bad: str) -> None:
    with pytest.raises(SigningKeyError) as refused:
        load_signer(load_settings({"TRACE_SIGNER_KEY": bad}))
    assert bad not in str(refused.value)


def test_no_key_at_all_is_a_clear_error() -> None:
    with pytest.raises(SigningKeyError, match="TRACE_SIGNER_KEY or TRACE_SIGNER_KEYSTORE"):
        load_signer(load_settings({}))
