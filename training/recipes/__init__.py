"""Recipes: how the bundled model itsd-tiny is made and checked, its photos, and the demo batch's inputs."""
