"""Escrow settlement tied to delivery confirmation (DESIGN §9)."""
