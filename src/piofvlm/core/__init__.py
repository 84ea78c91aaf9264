"""The shared mechanism: hooks, sequence rebuild, masks and selection rules. Methods never need to edit it."""
