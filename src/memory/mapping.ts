/**
 * Maps the frontend's memory-region fds into this process (MAP_SHARED), so guest RAM is addressable here.
 */
import { fstatSync } from 'node:fs';
import { closeQuietly, mmap, munmap, MAP_SHARED, PROT_READ, PROT_WRITE } from '../os/libc.js';
import type { RegionDescriptor } from './guest-memory.js';

/** A region mapped into this process. */
export interface RegionMapping {
  /** What the frontend described. */
  readonly region: RegionDescriptor;
  /** Address of the region's first byte here. */
  readonly hostAddr: number;
  /** The whole mapping (it starts at fd offset 0, as hugetlbfs needs aligned offsets). */
  readonly mapAddr: number;
  readonly mapLen: number;
}

/** Maps one region from `fd` and closes the fd (the mapping keeps the memory alive). */
export function mapRegion(region: RegionDescriptor, fd: number): RegionMapping {
  try {
    // Touching a page past the end of a file mapping raises SIGBUS, which would kill the daemon.
    const st = fstatSync(fd);
    if (st.isFile() && st.size < region.size + region.mmapOffset) {
      throw new RangeError(`region [gpa 0x${region.guestAddr.toString(16)} +${region.size}] at fd offset ${region.mmapOffset} extends past the end of its fd (${st.size} bytes)`);
    }
    // Mapping from offset 0 sidesteps alignment rules of the backing fs (hugetlbfs wants huge-page offsets).
    const mapLen = region.size + region.mmapOffset;
    const mapAddr = mmap(mapLen, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return { region, hostAddr: mapAddr + region.mmapOffset, mapAddr, mapLen };
  } finally {
    closeQuietly(fd);
  }
}

/** Unmaps a region. */
export function unmapRegion(m: RegionMapping): void {
  munmap(m.mapAddr, m.mapLen);
}
