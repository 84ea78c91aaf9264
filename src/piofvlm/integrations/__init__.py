"""Integrations with third-party tools. Each submodule imports its tool itself: importing piofvlm imports none."""
