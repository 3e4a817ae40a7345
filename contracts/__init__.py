"""Solidity contracts of the TRACE economy, their artifacts, bindings and chain client."""
