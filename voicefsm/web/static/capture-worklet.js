// voicefsm microphone capture: an AudioWorklet processor that turns the microphone's float
// samples (at the AudioContext's rate, usually 48 kHz or 44.1 kHz) into 16-bit little-endian
// PCM at 16 kHz, mono, and posts it to the page in fixed chunks (320 samples = 20 ms).
//
// Resampling: a windowed-sinc low-pass (cutoff 0.45 x 16 kHz, so nothing above 7.2 kHz folds
// back) on the input, then linear interpolation at the output instants. Cheap (a few dozen
// multiply-adds per input sample) and clean enough for speech recognition.
//
// Messages to the page: {type: "chunk", pcm: ArrayBuffer (Int16, 640 bytes), level: 0..1 RMS}.

const DEFAULT_TARGET_RATE = 16000;
const DEFAULT_CHUNK_SAMPLES = 320;

function lowPassTaps(inputRate, targetRate) {
  const ratio = inputRate / targetRate;
  if (ratio <= 1) return new Float32Array([1]);
  const count = 2 * Math.ceil(4 * ratio) + 1; // 25 taps at 48 kHz
  const cutoff = (0.45 * targetRate) / inputRate; // cycles per input sample
  const mid = (count - 1) / 2;
  const taps = new Float32Array(count);
  let sum = 0;
  for (let i = 0; i < count; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const window = 0.54 - 0.46 * Math.cos((2 * Math.PI * i) / (count - 1)); // Hamming
    taps[i] = sinc * window;
    sum += taps[i];
  }
  for (let i = 0; i < count; i++) taps[i] /= sum; // unity gain at DC
  return taps;
}

class VoicefsmCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.targetRate = opts.targetRate || DEFAULT_TARGET_RATE;
    this.chunkSamples = opts.chunkSamples || DEFAULT_CHUNK_SAMPLES;
    this.step = sampleRate / this.targetRate; // input samples per output sample
    this.taps = lowPassTaps(sampleRate, this.targetRate);
    this.history = this.taps.length - 1; // input samples kept from the previous block
    this.work = new Float32Array(this.history + 128); // history followed by the new block
    this.filtered = new Float32Array(128);
    this.position = 0; // next output instant, in input samples from the start of this block
    this.previous = 0; // last filtered sample of the previous block (index -1)
    this.chunk = new Int16Array(this.chunkSamples);
    this.fill = 0;
    this.energy = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || input[0].length === 0) return true; // not connected yet
    const n = input[0].length;
    if (this.work.length < this.history + n) {
      const grown = new Float32Array(this.history + n);
      grown.set(this.work.subarray(0, this.history));
      this.work = grown;
      this.filtered = new Float32Array(n);
    }
    const work = this.work;
    const h = this.history;
    // Mix down to mono after the kept history.
    const channels = input.length;
    for (let i = 0; i < n; i++) {
      let s = 0;
      for (let c = 0; c < channels; c++) s += input[c][i];
      work[h + i] = s / channels;
    }
    // Low-pass filter (a constant delay of half the filter length; harmless).
    const taps = this.taps;
    const count = taps.length;
    const filtered = this.filtered;
    for (let i = 0; i < n; i++) {
      let acc = 0;
      for (let k = 0; k < count; k++) acc += taps[k] * work[i + k];
      filtered[i] = acc;
    }
    work.copyWithin(0, n, n + h);
    // Linear interpolation at the output instants; index -1 is the previous block's last sample.
    let pos = this.position;
    while (pos < n - 1) {
      const i = Math.floor(pos);
      const frac = pos - i;
      const a = i < 0 ? this.previous : filtered[i];
      const b = filtered[i + 1];
      this.emit(a + (b - a) * frac);
      pos += this.step;
    }
    this.position = pos - n;
    this.previous = filtered[n - 1];
    return true;
  }

  emit(sample) {
    const s = sample > 1 ? 1 : sample < -1 ? -1 : sample;
    this.chunk[this.fill++] = s < 0 ? Math.round(s * 32768) : Math.round(s * 32767);
    this.energy += s * s;
    if (this.fill === this.chunkSamples) {
      const pcm = this.chunk.buffer;
      const level = Math.sqrt(this.energy / this.chunkSamples);
      this.port.postMessage({ type: "chunk", pcm, level }, [pcm]);
      this.chunk = new Int16Array(this.chunkSamples);
      this.fill = 0;
      this.energy = 0;
    }
  }
}

registerProcessor("voicefsm-capture", VoicefsmCaptureProcessor);
