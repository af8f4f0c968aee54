"""The ground floor: settings (one frozen object that validates itself), typed errors with a hint, and the
record schema (interactions, feedback, learning events). Imports nothing else from the package."""
