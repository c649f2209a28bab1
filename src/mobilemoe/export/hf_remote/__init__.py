"""Remote code (``trust_remote_code``) copied verbatim into every Hugging Face export; not imported here."""
