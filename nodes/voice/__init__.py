"""The voice satellite: wake word → voice activity → speech-to-text → intent → answer → speech."""
