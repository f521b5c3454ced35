"""C++ sources of featcal._C; featcal.extension compiles them on first use."""
