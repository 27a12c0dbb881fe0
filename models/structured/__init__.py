"""The structured family's kit: seeded generators of its built-in datasets (spoofed digits so far)."""
