"""`livepipe demo`: a scripted conversation that runs anywhere."""
