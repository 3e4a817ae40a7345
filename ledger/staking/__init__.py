"""Staking pools and their rewards (DESIGN §8): the accumulator and the books it keeps."""
