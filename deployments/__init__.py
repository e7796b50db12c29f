"""Ray Serve deployments of pdserve and its command line."""
