"""Small helpers shared by every layer (registry, atomic writes, seeding)."""
