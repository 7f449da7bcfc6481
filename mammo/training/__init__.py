"""One stage from tables to checkpoints: ``config`` (the frozen run configuration), ``inputs`` (tables, splits and
files checked before training), ``trainer`` (one stage's wiring), ``engine`` (seeding, loaders, the epoch loop,
checkpoint rotation, logging), ``datasets`` (torch datasets and augmentation), ``roi_crops`` (stage-2 crops made by
the trained stage 1)."""
