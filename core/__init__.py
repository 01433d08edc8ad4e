"""The contract every itsd part shares: jobs, results, settings, errors, manifests, image rules."""
