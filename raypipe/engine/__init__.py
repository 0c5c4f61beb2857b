"""The engine: model loading, generation, hooked projection and capture. Pure torch, no Ray."""
