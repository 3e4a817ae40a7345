"""Signing keys, from the environment or an encrypted keystore file; never logged, never stored."""

from __future__ import annotations

import json

from eth_account import Account
from eth_account.signers.local import LocalAccount

from ledger.settings import Settings


class SigningKeyError(ValueError):
    """No usable signing key is configured (the message never contains key material)."""


def load_signer(settings: Settings) -> LocalAccount:
    """The platform's signing key: ``TRACE_SIGNER_KEY``, else ``TRACE_SIGNER_KEYSTORE`` decrypted
    with ``TRACE_SIGNER_KEYSTORE_PASSWORD``."""
    if settings.signer_key:
        return _from_hex(settings.signer_key, "TRACE_SIGNER_KEY")
    if settings.signer_keystore is not None:
        if settings.signer_keystore_password is None:
            raise SigningKeyError("TRACE_SIGNER_KEYSTORE is set but TRACE_SIGNER_KEYSTORE_PASSWORD is not")
        try:
            keystore = json.loads(settings.signer_keystore.read_text())
            secret = Account.decrypt(keystore, settings.signer_keystore_password)
        except FileNotFoundError as exc:
            raise SigningKeyError(f"no keystore file at {settings.signer_keystore}") from exc
        except (OSError, ValueError, KeyError, TypeError):
            # The underlying message could echo key material; say only what failed.
            raise SigningKeyError("the keystore cannot be decrypted with the given password") from None
        account: LocalAccount = Account.from_key(secret)
        return account
    raise SigningKeyError("no signing key: set TRACE_SIGNER_KEY or TRACE_SIGNER_KEYSTORE")


def load_deployer(settings: Settings) -> LocalAccount:
    """The key that deploys the contracts and grants roles (defaults to the signing key)."""
    if settings.deployer_key:
        return _from_hex(settings.deployer_key, "TRACE_DEPLOYER_KEY")
    return load_signer(settings)


def _from_hex(text: str, name: str) -> LocalAccount:
    try:
        account: LocalAccount = Account.from_key(text.strip())
    except (ValueError, TypeError):
        raise SigningKeyError(f"{name} is not a 32-byte hex private key") from None
    return account
