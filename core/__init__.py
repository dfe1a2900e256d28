"""Bottom layer: what every package uses (progress, seeding, checkpoint I/O, hashing, geometry)."""
