"""Reading and writing Caffe files: prototxt text, caffemodel wire format, our schema, atomic output."""
