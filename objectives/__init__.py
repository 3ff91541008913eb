"""Loss terms, one file each, and the registry that builds an Objective from config."""
