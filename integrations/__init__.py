"""Integrations of metafair-opt with concrete models and data (``metafair_opt.integrations``)."""
